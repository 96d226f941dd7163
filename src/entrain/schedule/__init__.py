"""Assignment policies (Entrain and the baselines) and the metrics of an assignment."""

from __future__ import annotations

from collections.abc import Callable

from entrain.cost.batch import CostedBatch
from entrain.schedule.assignment import Assignment
from entrain.schedule.baselines import (
    encoder_balanced,
    encoder_rebalance,
    joint,
    llm_balanced,
    sequential,
)
from entrain.schedule.hierarchical import (
    ORDERS,
    EntrainConfig,
    check_max_deferred_tokens,
    check_order,
    entrain,
)
from entrain.schedule.metrics import BatchMetrics, evaluate, lower_bound, mean_metrics, work

Policy = Callable[[CostedBatch, int, int], Assignment]

POLICIES: dict[str, Policy] = {
    "sequential": sequential,
    "llm-balanced": llm_balanced,
    "encoder-balanced": encoder_balanced,
    "joint": joint,
    "encoder-rebalance": encoder_rebalance,
    "entrain": entrain,
}
BASELINES: tuple[str, ...] = tuple(p for p in POLICIES if p != "entrain")


def replica_pool(policy: str, dp: int, pool: int | None = None) -> int:
    """Size of the blocks of consecutive replicas (0..k-1, k..2k-1, ...) that exchange units
    under `policy`: an encoder's units feed only LLMs of its own block. The coupled
    policies keep every unit on its sample's replica; encoder-rebalance spreads units over
    all replicas; Entrain over `pool` replicas (all when None). The runtime opens channels
    between encoders and LLMs of one block only."""
    if policy == "encoder-rebalance":
        return dp
    if policy == "entrain":
        return dp if pool is None else max(1, min(pool, dp))
    return 1


def assign(
    policy: str,
    batch: CostedBatch,
    dp: int,
    microbatches: int,
    lookahead: int | None = None,
    pool: int | None = None,
    max_deferred_tokens: int | None = None,
    order: str = "light-first",
) -> Assignment:
    """Run a policy by name; checks the arguments a user can get wrong. `lookahead` limits
    how far ahead Entrain may encode a unit, `pool` how many replicas share encoders and
    `max_deferred_tokens` how many embedding tokens an LLM replica may hold for later
    microbatches, `order` how Entrain orders and packs microbatches (hierarchical.ORDERS;
    the other policies ignore all four: they encode every unit in its sample's own
    microbatch, so they never defer)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    if dp < 1 or microbatches < 1:
        raise ValueError(
            f"dp and microbatches must be >= 1, got dp={dp}, microbatches={microbatches}"
        )
    check_max_deferred_tokens(max_deferred_tokens)
    check_order(order)
    if policy == "entrain":
        cfg = EntrainConfig(
            lookahead=lookahead, pool=pool, max_deferred_tokens=max_deferred_tokens, order=order
        )
        return entrain(batch, dp, microbatches, cfg)
    return POLICIES[policy](batch, dp, microbatches)


__all__ = [
    "BASELINES",
    "ORDERS",
    "POLICIES",
    "replica_pool",
    "Assignment",
    "BatchMetrics",
    "EntrainConfig",
    "Policy",
    "assign",
    "check_order",
    "entrain",
    "evaluate",
    "lower_bound",
    "mean_metrics",
    "work",
]

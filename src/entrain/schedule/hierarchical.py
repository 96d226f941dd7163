"""Entrain's hierarchical assignment: balance the LLM, then fit encoder work around it.

The freedom Entrain uses is that a unit's encoder microbatch need not be its sample's LLM
microbatch, only no later (docs/design.md section 2). The policy:

1. LLM: samples are packed into all D*M microbatches by LPT on LLM cost, microbatches are
   dealt to replicas so that replica totals match (DP all-reduce waits for the slowest).
2. Order: within a replica, microbatches whose samples need the least encoder work per unit
   of LLM work go first. Their deadlines are then easy to meet, and encoder work of later,
   encoder-heavy microbatches can be pulled forward into the slack of earlier ones; seen
   from the LLM, that work is deferred to later microbatches of the same iteration.
3. Encoders: each encoder's units (an image, a video frame group, a 30 s audio chunk) are
   placed earliest-deadline-first into (microbatch, replica) bins, pooling all replicas'
   encoders (an embedding can be sent to any LLM replica). Each bin's target is the
   encoder's share of the LLM work in that microbatch: a pipeline whose stages are sized to
   their mean work flows without bubbles when every stage's work per microbatch rises and
   falls together, and is only hurt where they disagree.
4. Guarantee: the result is compared with the coupled `joint` assignment; per module, it is
   never allowed a larger maximum microbatch (the "balanced" order of step 5 is held to
   encoder-rebalance instead). Where the proportional targets would exceed
   it, flat targets are tried, then joint's own LLM packing, under which a coupled
   placement of each encoder always meets the bound.
5. Order: `EntrainConfig.order` picks what step 2 sorts by, a knob the planner tries per plan:
   light-first (above) suits a pipeline the LLM bounds; "heavy-first" one that a frozen
   encoder bounds (its forward-only stage runs ahead, and what is left after its last
   microbatch is the LLM work of the last ones, so they had better be light); "balanced"
   packs the LLM as data-parallel trainers do (replicas, then microbatches, by LPT), keeps
   that order and rebalances only the encoders, never above encoder-rebalance's maximum
   per encoder: what a deep LLM pipeline with evenly filled microbatches wants.
   "encoder-first" does the same from encoder-balanced's packing (by the heaviest
   encoder's work), for a plan that a trained encoder bounds and that has no LLM pipeline
   to absorb an uneven encoder (with pool 1 and lookahead 0 it is encoder-balanced itself);
   "joint" likewise from the joint baseline's packing.
6. Memory: with `EntrainConfig.max_deferred_tokens`, an assignment whose LLM replicas would
   hold more embedding tokens than the cap is recomputed with a shorter lookahead, down to
   0, where every unit is encoded in its sample's own microbatch and nothing is held.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from entrain.cost.batch import CostedBatch
from entrain.schedule.assignment import Assignment
from entrain.schedule.baselines import encoder_balanced, encoder_rebalance, joint, joint_bins
from entrain.schedule.metrics import deferred_tokens
from entrain.schedule.packing import Ranks, cost_ranks, lpt, place_bins, split_bins


@dataclass(kw_only=True)
class EntrainConfig:
    """Knobs of the Entrain policy; the defaults are what the benchmarks use."""

    proportional: bool = True
    """Size each encoder bin to the LLM work of its microbatch (False: equal bins)."""
    margin: float = 1.0
    """Slack (in mean microbatches of encoder work, pooled over replicas) the microbatch order
    aims to keep ahead of each encoder's deadlines: enough for units to fit, no more, so
    units are not pulled from far ahead."""
    lookahead: int | None = None
    """How many microbatches before its sample's LLM microbatch a unit may be encoded (None:
    any, the best balance). Every microbatch of deferral delays that encoder microbatch's
    backward until the LLM's backward of the later microbatch, and in a 1F1B pipeline with
    a trained encoder a long wait can stall it; the planner picks this per plan
    (ParallelPlan.encoder_lookahead) from simulations."""
    pool: int | None = None
    """Replicas whose encoders share units (None: all of them). Pooling balances best, but
    every LLM microbatch then waits on the encoders of the whole pool; the planner picks it
    per plan (ParallelPlan.encoder_pool)."""
    smooth: float = 0.02
    """Microbatches run in ascending order of LLM work, in steps of this fraction of a mean
    microbatch; within a step, in the order that suits encoder deadlines."""
    order: str = "light-first"
    """How each replica's microbatches are ordered and packed (step 5 of the module
    docstring): one of ORDERS."""
    fine: float = 0.01
    """Units smaller than this fraction of a bin are placed by a cut instead of by LPT."""
    repair_steps: int | None = None
    """Moves/swaps allowed per encoder to lower the worst bin; None means 2*D*M."""
    max_deferred_tokens: int | None = None
    """Most embedding tokens an LLM replica may hold at once (None: no cap). A unit encoded
    before its sample's LLM microbatch leaves its embeddings in the LLM replica's memory
    until that microbatch runs (`metrics.deferred_tokens`), on top of the activations the
    pipeline already holds; the cap bounds that memory. An assignment over the cap is
    recomputed with a shorter `lookahead`, down to 0, which holds nothing; so a cap costs
    balance only in the iterations where it binds."""


ORDERS = ("light-first", "heavy-first", "balanced", "encoder-first", "joint")
PACKED_AS = {"balanced": encoder_rebalance, "encoder-first": encoder_balanced, "joint": joint}
"""Orders that keep a baseline's LLM packing and order and rebalance only encoder units."""


def check_order(order: str) -> None:
    """Raise ValueError unless `order` is one of ORDERS."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")


def check_max_deferred_tokens(cap: int | None) -> None:
    """Raise ValueError unless `cap` is None or a count of tokens >= 0."""
    if cap is not None and cap < 0:
        raise ValueError(f"max_deferred_tokens must be >= 0 (or None for no cap), got {cap}")


def _deal_to_replicas(bin_load: np.ndarray, dp: int) -> np.ndarray:
    """Replica of each of the D*M bins: heaviest bins dealt in snake order, M per replica,
    so replica totals come out nearly equal."""
    B = bin_load.shape[0]
    order = np.argsort(-bin_load, kind="stable")
    rnd, pos = np.divmod(np.arange(B), dp)
    snake = np.where(rnd % 2 == 0, pos, dp - 1 - pos)
    rep = np.empty(B, dtype=np.int64)
    rep[order] = snake
    return rep


def _order_slots(
    bin_rep: np.ndarray,
    llm_load: np.ndarray,
    demand: np.ndarray,
    dp: int,
    M: int,
    margin: float,
    smooth: float,
    heavy_first: bool = False,
) -> np.ndarray:
    """Microbatch index of each bin within its replica.

    An encoder's units must be encoded by their sample's microbatch, so the encoder work due
    by microbatch k (the demand) must fit in what microbatches 0..k can hold (the capacity,
    the encoder's share of their LLM work): the running overdraft, demand minus capacity,
    must stay <= 0. But slack is not free either: slack in early microbatches is filled by
    pulling units from far ahead, whose embeddings then wait (memory) and whose encoder
    backward waits for the LLM's (a tail at the end of the iteration). So bins are chosen
    greedily, microbatch by microbatch and replica by replica (encoders are pooled across
    replicas), to keep every encoder's running overdraft inside [-margin, 0], in bins of
    mean work; a swap search then repairs what the greedy left for the end.
    `demand` is (encoders, bins). With `heavy_first`, LLM work descends instead.
    """
    B = bin_rep.shape[0]
    slot = np.zeros(B, dtype=np.int64)
    total = demand.sum(axis=1, keepdims=True)
    if demand.shape[0] == 0 or not total.any():
        order = np.lexsort((-llm_load if heavy_first else llm_load, bin_rep))
        slot[order] = np.tile(np.arange(M), dp)
        return slot
    llm_share = llm_load / llm_load.sum() if llm_load.sum() > 0 else np.full(B, 1.0 / B)
    scale = np.where(total > 0, total / B, 1.0)
    x = (demand - total * llm_share) / scale  # overdraft each bin adds, in bins of mean work
    # Primary order: LLM work ascending, in steps of `smooth` of a mean microbatch. 1F1B
    # pairs the forward of one microbatch with the backward of an earlier one on every
    # stage; when neighbours differ in size, each such step waits for its slowest partner.
    mean = max(float(llm_load.mean()), 1e-300)
    level = np.floor(llm_load / (smooth * mean)).astype(np.int64)
    if heavy_first:
        level = -level
    left = [np.flatnonzero(bin_rep == r).tolist() for r in range(dp)]
    greedy = _greedy_order if x.shape[0] <= 2 else _greedy_order_numpy
    table = np.array(greedy(left, level.tolist(), x, margin, M), dtype=np.int64).reshape(M, dp).T
    table = _improve_order(table, x, margin, level)
    slot[table] = np.arange(M)[None, :]
    return slot


def _greedy_order(
    left: list[list[int]], level: list[int], x: np.ndarray, margin: float, M: int
) -> list[int]:
    """`_order_slots`' greedy pick, microbatch by microbatch and replica by replica: the bin
    of microbatch k of replica r, in that order (k major). `left[r]` holds the bins of
    replica r not yet run; the pick is the first of the lightest level that leaves the
    running overdrafts least out of band (`_band_cost`).

    It runs D*M times, each over a replica's few bins and one or two encoders, so it is
    written over Python floats, computing each cost exactly as `_band_cost` does.
    """
    E = x.shape[0]
    xs = x.T.tolist() if E == 2 else [[v, 0.0] for v in x[0].tolist()]
    run0, run1 = 0.0, 0.0
    inf = float("inf")
    out = []
    for _ in range(M):
        for cand in left:
            low = min(level[b] for b in cand)
            best, best_cost = 0, inf
            for i, b in enumerate(cand):
                if level[b] != low:
                    continue
                x0, x1 = xs[b]
                p0 = run0 + x0
                over = p0 if p0 > 0.0 else 0.0
                s0 = -p0 - margin
                slack = s0 if s0 > 0.0 else 0.0
                if E == 2:
                    p1 = run1 + x1
                    if p1 > over:
                        over = p1
                    s1 = -p1 - margin
                    slack = slack + (s1 if s1 > 0.0 else 0.0)
                cost = 100.0 * over + slack
                if cost < best_cost:
                    best, best_cost = i, cost
            b = cand.pop(best)
            x0, x1 = xs[b]
            run0, run1 = run0 + x0, run1 + x1
            out.append(b)
    return out


def _greedy_order_numpy(
    left: list[list[int]], level: list[int], x: np.ndarray, margin: float, M: int
) -> list[int]:
    """`_greedy_order` for any number of encoders, one numpy step per pick."""
    running = np.zeros(x.shape[0])
    lv = np.asarray(level)
    out = []
    for _ in range(M):
        for cand_list in left:
            cand = np.asarray(cand_list)
            same = lv[cand] == lv[cand].min()  # among the lightest level, mind deadlines
            i = int(
                np.flatnonzero(same)[
                    _band_cost(running[:, None] + x[:, cand[same]], margin).argmin()
                ]
            )
            running += x[:, cand[i]]
            out.append(cand_list.pop(i))
    return out


def _band_cost(prefix: np.ndarray, margin: float) -> np.ndarray:
    """How far running overdrafts leave [-margin, 0]: over 0 (infeasible, weighted heavily)
    and under -margin (units pulled from far ahead). Leading axis encoders; reduces it."""
    over = np.maximum(prefix, 0.0).max(axis=0)
    slack = np.maximum(-prefix - margin, 0.0).sum(axis=0)
    return 100.0 * over + slack


def _improve_order(
    table: np.ndarray,
    x: np.ndarray,
    margin: float,
    level: np.ndarray,
    max_swaps: int | None = None,
) -> np.ndarray:
    """Swap two microbatches (at most 16 apart) of one replica while that lowers the band
    cost summed over the running overdrafts (the last is always 0 and left out). One
    replica per step, round robin, so a step stays cheap for large D and M."""
    D, M = table.shape
    if M < 3:
        return table
    k1, k2 = np.triu_indices(M, 1)
    near = k2 - k1 <= 16  # distant swaps rarely help and would make a step O(M^3)
    k1, k2 = k1[near], k2[near]
    inside = (np.arange(M)[None, :] >= k1[:, None]) & (np.arange(M)[None, :] < k2[:, None])
    stale = 0
    for step in range(max_swaps if max_swaps is not None else 2 * M):
        r = step % D
        prefix = np.cumsum(x[:, table].sum(axis=1), axis=1)[:, :-1]  # (E, M-1)
        score = _band_cost(prefix, margin).sum()
        # swapping slots k1 < k2 of replica r shifts the prefixes k1..k2-1 by x[b2] - x[b1]
        delta = x[:, table[r, k2]] - x[:, table[r, k1]]  # (E, P)
        moved = prefix[:, None, :] + delta[..., None] * inside[None, :, :-1]  # (E, P, M-1)
        new = _band_cost(moved, margin).sum(axis=-1)
        new[level[table[r, k1]] != level[table[r, k2]]] = np.inf  # keep the LLM order smooth
        p = int(new.argmin())
        if new[p] >= score - 1e-12:
            stale += 1
            if stale >= D:
                break
            continue
        stale = 0
        a, b = k1[p], k2[p]
        table[r, a], table[r, b] = table[r, b], table[r, a]
    return table


@dataclass(frozen=True)
class _Work:
    """Each module's costs in one batch, worked out once: `UnitTable.cost` adds two arrays
    on every access, and a video-heavy batch has 150k units."""

    llm: np.ndarray  # (N,) per sample
    enc: dict[str, np.ndarray]  # encoder -> (U,) per unit
    ranks: dict[str, Ranks]  # encoder -> its units' costs ranked (to sort them fast)

    @staticmethod
    def of(batch: CostedBatch) -> _Work:
        enc = {e: u.cost for e, u in batch.units.items()}
        return _Work(batch.llm_cost, enc, {e: cost_ranks(c) for e, c in enc.items()})


def _max_work(cost: np.ndarray, bins: np.ndarray, B: int) -> float:
    """Work of the fullest of B bins, holding items of `cost` in `bins`."""
    return float(np.bincount(bins, weights=cost, minlength=B).max(initial=0.0))


def _targets(enc_total: float, llm_rm: np.ndarray, proportional: bool) -> np.ndarray:
    """(M, D) target work of one encoder per microbatch and replica."""
    D, M = llm_rm.shape
    tot = llm_rm.sum()
    if proportional and tot > 0:
        return (enc_total * llm_rm / tot).T
    return np.full((M, D), enc_total / (D * M))


def _place_pooled(
    cost: np.ndarray,
    deadline: np.ndarray,
    home_of: tuple[np.ndarray, np.ndarray],
    targets: np.ndarray,
    cfg: EntrainConfig,
    cap: float,
    ranks: Ranks,
) -> np.ndarray | None:
    """place_bins within each group of `cfg.pool` replicas (all replicas when None): a
    unit is encoded by an encoder of its sample's group, whose targets are rescaled to the
    group's own units. `home_of` is (each sample's replica, each unit's sample). Returns each
    unit's bin k*D + r, or None when some bin is sure to hold more work than `cap`; `ranks`
    is `cost_ranks(cost)`."""
    M, D = targets.shape
    pool = D if cfg.pool is None else max(1, min(cfg.pool, D))
    args = (cfg.fine, cfg.repair_steps, cfg.lookahead, cap)
    if pool == D:
        return place_bins(cost, deadline, targets, *args, ranks=ranks)
    home = home_of[0][home_of[1]]  # each unit's sample's replica
    bins = np.zeros(cost.shape[0], dtype=np.int64)
    for g0 in range(0, D, pool):
        mine = np.flatnonzero((home >= g0) & (home < g0 + pool))
        if mine.size == 0:
            continue
        t = targets[:, g0 : g0 + pool]
        total = t.sum()
        t = (
            t * (cost[mine].sum() / total)
            if total > 0
            else np.full_like(t, cost[mine].sum() / t.size)
        )
        got = place_bins(cost[mine], deadline[mine], t, *args, ranks=ranks.subset(mine))
        if got is None:
            return None
        k, r = split_bins(got, t.shape[1])
        bins[mine] = k * D + r + g0
    return bins


def _try(
    batch: CostedBatch,
    work: _Work,
    dp: int,
    M: int,
    bins: np.ndarray,
    bin_rep: np.ndarray,
    bound: dict[str, float],
    cfg: EntrainConfig,
    fallback: str | Assignment | None,
) -> Assignment | None:
    """Entrain with the LLM packed into `bins` (with `bin_rep` their replicas). An encoder
    that would exceed `bound` is placed by `fallback` instead: "coupled" (each unit in its
    sample's microbatch), an assignment that keeps `bins` in their order (its placement),
    or None (no assignment: return None)."""
    B = dp * M
    llm_load = np.bincount(bins, weights=work.llm, minlength=B)
    demand = np.array(
        [
            np.bincount(bins[u.sample], weights=work.enc[e], minlength=B)
            for e, u in batch.units.items()
        ]
    ).reshape(len(batch.units), B)
    if cfg.order in PACKED_AS:  # keep the baseline's order: r*M + k is slot k
        slot_of_bin = np.arange(B) % M
    else:
        heavy = cfg.order == "heavy-first"
        slot_of_bin = _order_slots(bin_rep, llm_load, demand, dp, M, cfg.margin, cfg.smooth, heavy)
    s_rep, s_mb = bin_rep[bins], slot_of_bin[bins]
    llm_rm = np.zeros((dp, M))
    llm_rm[bin_rep, slot_of_bin] = llm_load
    unit_rep, unit_mb = {}, {}
    for e, u in batch.units.items():
        deadline, cost = s_mb[u.sample], work.enc[e]
        placed = None
        for prop in (True, False) if cfg.proportional else (False,):
            targets = _targets(float(cost.sum()), llm_rm, prop)
            got = _place_pooled(
                cost, deadline, (s_rep, u.sample), targets, cfg, bound[e], work.ranks[e]
            )
            if got is not None and _max_work(cost, got, B) <= bound[e]:
                mb, rep = split_bins(got, dp)
                placed = (rep, mb)
                break
        if placed is None:
            if fallback is None:
                return None
            if isinstance(fallback, Assignment):
                placed = (fallback.unit_replica[e], fallback.unit_mb[e])
            else:
                placed = (s_rep[u.sample], deadline)
        unit_rep[e], unit_mb[e] = placed
    return Assignment(dp, M, s_rep, s_mb, unit_rep, unit_mb)


def entrain(
    batch: CostedBatch, dp: int, microbatches: int, config: EntrainConfig | None = None
) -> Assignment:
    """The Entrain assignment of one global batch (see the module docstring).

    With `config.max_deferred_tokens` set, no LLM replica holds more embedding tokens than
    that while it runs any microbatch: an assignment over the cap is recomputed with the
    lookahead one shorter each time (peak deferral need not fall with the lookahead, so
    each is tried in turn), down to lookahead 0, which defers nothing.
    """
    cfg = config or EntrainConfig()
    check_order(cfg.order)
    cap = cfg.max_deferred_tokens
    check_max_deferred_tokens(cap)
    work = _Work.of(batch)
    asg = _entrain(batch, work, dp, microbatches, cfg)
    if cap is None:
        return asg
    M = microbatches
    # a lookahead of M-1 or more allows every earlier microbatch, the same as None
    lookahead = M - 1 if cfg.lookahead is None else min(cfg.lookahead, M - 1)
    while deferred_tokens(batch, asg).max(initial=0.0) > cap:
        lookahead -= 1
        if lookahead < 0:  # unreachable: lookahead 0 encodes every unit in its own microbatch
            raise RuntimeError("Entrain could not meet max_deferred_tokens even without deferral")
        asg = _entrain(batch, work, dp, M, replace(cfg, lookahead=lookahead))
    return asg


def _entrain(batch: CostedBatch, work: _Work, dp: int, M: int, cfg: EntrainConfig) -> Assignment:
    """`entrain` without the cap on deferred tokens."""
    B = dp * M
    slack = 1 + 1e-9
    if cfg.order in PACKED_AS:
        # the LLM as that baseline packs it (encoder-rebalance, encoder-balanced: by the
        # heaviest encoder's work, joint); no encoder's worst microbatch above its own
        er = PACKED_AS[cfg.order](batch, dp, M)
        pooled = cfg.pool is None or cfg.pool >= dp  # else er's moves may leave the pool
        if pooled:
            home = {e: er.unit_bin(e) for e in batch.units}
        else:  # within a pool, the coupled placement on er's packing is what is sure to fit
            home = {e: er.llm_bin()[u.sample] for e, u in batch.units.items()}
        bound = {e: _max_work(work.enc[e], home[e], B) * slack for e in batch.units}
        fallback = er if pooled else "coupled"
        asg = _try(batch, work, dp, M, er.llm_bin(), np.arange(B) // M, bound, cfg, fallback)
        assert asg is not None
        return asg
    jb = joint_bins(batch, dp, M)
    bound = {e: _max_work(work.enc[e], jb[u.sample], B) * slack for e, u in batch.units.items()}
    bound["llm"] = _max_work(work.llm, jb, B) * slack
    lb = lpt(work.llm, B)
    llm_load = np.bincount(lb, weights=work.llm, minlength=B)
    if llm_load.max(initial=0.0) <= bound["llm"]:
        rep = _deal_to_replicas(llm_load, dp)
        asg = _try(batch, work, dp, M, lb, rep, bound, cfg, None)
        if asg is not None:
            return asg
    # joint's packing: its bins are already r*M + k; a coupled encoder placement meets the bound
    asg = _try(batch, work, dp, M, jb, np.arange(B) // M, bound, cfg, "coupled")
    assert asg is not None
    return asg

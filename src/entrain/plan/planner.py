"""The static planner and the dynamic oracle.

The planner sees only macro statistics: the per-module work of whole global batches. It
enumerates the plans that fit G GPUs and the memory of the hardware, ranks them by a
closed-form estimate from the mean per-module work, simulates the best few on a sample of
global batches with the chosen policy, and keeps the one with the best throughput. It never
re-plans: the micro level (the policy) absorbs what varies from batch to batch.

The dynamic oracle re-plans for every global batch at no switching cost. Comparing the two
shows how much a static plan gives up (docs/design.md section 2).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from entrain.cost.batch import CostedBatch, common_unit
from entrain.cost.flops import module_params
from entrain.cost.hardware import Hardware
from entrain.models.spec import ModelSpec
from entrain.plan.memory import MemorySettings, plan_memory
from entrain.schedule.assignment import Assignment
from entrain.schedule.parallel import ParallelPlan
from entrain.schedule.steps import StepRecipe


@dataclass(kw_only=True)
class PlannerConfig:
    """What the planner searches over."""

    gpus: int
    """GPUs G the plan must use exactly."""
    global_batch: int
    """Samples per iteration."""
    microbatch_samples: float = 16.0
    """Samples per microbatch: about 16 is the wide regime, 1-2 the narrow one."""
    policy: str = "entrain"
    """Policy the plans are simulated with."""
    tp_options: tuple[int, ...] = (1,)
    """Tensor-parallel degrees tried for the LLM (and, up to 2, for encoders). The default, 1,
    keeps to layouts `entrain train` runs; larger degrees are for the simulator only (the
    runtime has no tensor parallelism yet)."""
    pp_options: tuple[int, ...] = tuple(range(1, 17))
    """LLM pipeline stages; layers are split as evenly as the count allows (Megatron's
    uneven split), so any count is a candidate."""
    entrain_variants: tuple[tuple[int | None, int | None, str], ...] = (
        (None, None, "light-first"),
        (1, None, "light-first"),
        (0, None, "light-first"),
        (1, 1, "light-first"),
        (0, 1, "light-first"),
        (1, None, "heavy-first"),
        (0, None, "heavy-first"),
        (0, None, "balanced"),
        (0, 1, "encoder-first"),
        (0, 1, "joint"),
    )
    """(deferral depth, replicas pooled, microbatch order) tried with each shortlisted plan
    when the policy is entrain; None is unlimited. Which order wins depends on which
    module bounds the plan's pipeline (schedule/hierarchical.py, step 5)."""
    shortlist: int = 12
    """Plans simulated after ranking by the closed-form estimate."""
    search_budget: float = 180.0
    """Rough seconds (see `search_seconds`) the simulations may take; a search estimated
    longer is narrowed to the best-ranked plans, and says so. Up to 1024 GPUs at the
    default sizes (16 samples per GPU, 4 batches) the whole search fits."""
    memory_headroom: float = 0.9
    """Fraction of GPU memory a plan may use."""
    memory: MemorySettings = field(default_factory=MemorySettings)
    """What the run will do that memory depends on (precision, recompute, ZeRO-1): the
    plan's `entrain train` flags say the same."""

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.global_batch < 1 or self.microbatch_samples <= 0:
            raise ValueError("gpus, global batch and microbatch size must be positive")


@dataclass
class Evaluated:
    """A plan with its simulated iteration time on each sampled batch."""

    plan: ParallelPlan
    estimate: float
    iter_times: list[float] = field(default_factory=list)

    def throughput(self, samples: list[int]) -> float:
        return float(sum(samples) / sum(self.iter_times))


@dataclass
class PlanResult:
    static: Evaluated
    oracle_times: list[float]
    oracle_plans: list[ParallelPlan]
    samples: list[int]
    simulated: list[Evaluated]
    feasible: int
    narrowed: str | None = None
    """Why and how the search was cut short of the whole (see `Search.narrowed`)."""

    @property
    def static_throughput(self) -> float:
        return self.static.throughput(self.samples)

    @property
    def oracle_throughput(self) -> float:
        return float(sum(self.samples) / sum(self.oracle_times))

    @property
    def static_over_oracle(self) -> float:
        return self.static_throughput / self.oracle_throughput

    def to_dict(self) -> dict:
        per_batch = [
            {
                "samples": n,
                "static_iter_time": s,
                "oracle_iter_time": o,
                "oracle_plan": p.describe(),
            }
            for n, s, o, p in zip(
                self.samples, self.static.iter_times, self.oracle_times, self.oracle_plans
            )
        ]
        return {
            "plan": self.static.plan.to_dict(),
            "plan_description": self.static.plan.describe(),
            "throughput": {"samples_per_s": self.static_throughput},
            "oracle_throughput": {"samples_per_s": self.oracle_throughput},
            "static_over_oracle": self.static_over_oracle,
            "feasible_plans": self.feasible,
            "search_narrowed": self.narrowed,
            "simulated_plans": [
                {"plan": e.plan.describe(), "throughput": e.throughput(self.samples)}
                for e in self.simulated
            ],
            "per_batch": per_batch,
        }


def _group_sizes(limit: int) -> list[int]:
    """GPU counts an encoder group may get: every count up to 8, then coarser steps."""
    sizes = list(range(1, 9)) + list(range(12, 33, 4)) + list(range(40, 257, 8))
    return [g for g in sizes if g <= limit]


def _encoder_groups(rest: int, n: int, tps: tuple[int, ...]) -> list[tuple[tuple[int, int], ...]]:
    """(tp, copies) for each of n encoders using exactly `rest` GPUs together."""
    if n == 0:
        return [()] if rest == 0 else []
    out = []
    for sizes in itertools.product(_group_sizes(rest), repeat=n - 1):
        last = rest - sum(sizes)
        if last < 1 or (last not in _group_sizes(rest)):
            continue
        options = [[(tp, g // tp) for tp in tps if g % tp == 0] for g in (*sizes, last)]
        out.extend(itertools.product(*options))
    return out


def enumerate_plans(spec: ModelSpec, cfg: PlannerConfig, gpus_per_node: int) -> list[ParallelPlan]:
    """Every plan that uses exactly G GPUs with TP groups inside a node. Encoders take any
    number of GPUs (as copies of a TP group, see ParallelPlan.encoder_dp)."""
    encoders = [e.name for e in spec.encoders]
    tps = tuple(t for t in cfg.tp_options if t <= gpus_per_node)
    enc_tps = tuple(t for t in tps if t <= 2)  # encoders are small: TP only when memory needs it
    out = []
    for dp in range(1, cfg.gpus + 1):
        if cfg.gpus % dp or dp > cfg.global_batch:
            continue
        per_replica = cfg.gpus // dp
        m = max(1, round(cfg.global_batch / dp / cfg.microbatch_samples))
        for tp, pp in itertools.product(tps, cfg.pp_options):
            if pp > spec.llm.num_hidden_layers or tp * pp >= per_replica + (0 if encoders else 1):
                continue
            for groups in _encoder_groups(per_replica - tp * pp, len(encoders), enc_tps):
                out.append(
                    ParallelPlan(
                        dp=dp,
                        llm_pp=pp,
                        llm_tp=tp,
                        microbatches=m,
                        encoder_tp={e: g[0] for e, g in zip(encoders, groups)},
                        encoder_dp={e: g[1] for e, g in zip(encoders, groups) if g[1] > 1},
                    )
                )
    return out


def _module_totals(batch: CostedBatch) -> dict[str, float]:
    out = {e: float(u.cost.sum()) for e, u in batch.units.items()}
    out["llm"] = float(batch.llm_cost.sum())
    return out


def estimate_time(
    spec: ModelSpec,
    plan: ParallelPlan,
    work: dict[str, float],
    hw: Hardware,
    seconds: Callable[[float, int], float],
    units: dict[str, float] | None = None,
) -> float:
    """Closed-form iteration time from mean per-module work: the slowest module group sets
    the pace of a (M + stages)-long pipeline, then gradients are all-reduced. Copies of an
    encoder only help as far as a microbatch has units to share among them (`units`: units
    of each encoder in a global batch)."""
    D, M, P = plan.dp, plan.microbatches, plan.llm_pp
    per = {"llm": seconds(work["llm"] / D, plan.llm_tp) / P}
    for e, tp in plan.encoder_tp.items():
        copies = plan.encoder_dp.get(e, 1)
        share = work[e] / D / copies
        if units is not None and copies > 1:
            # n units on c copies: LPT ends about one unit after the even share
            share *= 1 + copies / max(units[e] / (D * M), 1.0)
        per[e] = seconds(share, tp)
    stages = P + (1 if plan.encoder_tp else 0)
    t = max(per.values()) * (M + stages - 1) / M
    if D > 1:
        params = module_params(spec)
        link = hw.link(plan.world_size <= hw.gpus_per_node)
        t += 2 * (D - 1) / D * params["llm"] / (P * plan.llm_tp) * hw.bytes_per_value / link
    return t


# Rough seconds of the planner's own work, measured on one core of a shared 2-core machine:
# assigning a batch costs about 20 us a sample plus 0.1 us a sample per replica (the greedy
# split over replicas), simulating it about 11 us per microbatch per stage and replica.
ASSIGN_S_PER_SAMPLE = 20e-6
ASSIGN_S_PER_SAMPLE_REPLICA = 1e-7
SIM_S_PER_STAGE_MICROBATCH = 11e-6


@dataclass
class _Choice:
    """Plans to simulate: the shortlist (candidates for the static plan), the oracle's extra
    candidates, and the (deferral depth, pool, order) variants each is tried with (None: as
    it is, for policies other than Entrain)."""

    static: list[ParallelPlan]
    extra: list[ParallelPlan]
    variants: tuple[tuple[int | None, int | None, str], ...] | None
    fits: Callable[[ParallelPlan], bool] = lambda plan: True
    """Whether a variant fits in memory (a deeper deferral keeps more encoder activations)."""

    def plans(self) -> list[ParallelPlan]:
        """Shortlist first, then the extras, each with its variants that fit; no plan twice."""
        base = {p.describe(): p for p in self.static}
        for p in self.extra:
            base.setdefault(p.describe(), p)
        if self.variants is None:
            return list(base.values())
        return list(
            {
                q.describe(): q
                for p in base.values()
                for q in (
                    dataclasses.replace(p, encoder_lookahead=a, encoder_pool=g, encoder_order=o)
                    for a, g, o in self.variants
                )
                if self.fits(q)
            }.values()
        )

    def cut(self, static: list[ParallelPlan], variants=None) -> _Choice:
        """The same search with only `static` (no extras) and, if given, fewer variants."""
        return _Choice(static, [], self.variants if variants is None else variants, self.fits)

    @property
    def n_static(self) -> int:
        """How many of `plans()` come from the shortlist (candidates for the static plan)."""
        return len(self.cut(self.static).plans())


@dataclass
class Search:
    """What `Planner.plan` will simulate, known before the first simulation (the CLI says
    it up front and counts the simulations down)."""

    layouts: int
    """Plans that use exactly the GPUs."""
    feasible: int
    """Of those, plans that fit in memory."""
    plans: list[ParallelPlan]
    """Plans to simulate: the static plan's candidates first, then the oracle's extras."""
    n_static: int
    """How many of `plans` (from the front) the static plan is chosen from."""
    samples: list[int]
    """Samples of each batch every plan is simulated on."""
    seconds: float
    """Rough time the simulations take (`Planner.search_seconds`)."""
    narrowed: str | None = None
    """Why and how the search was cut short of the whole, when it was."""

    @property
    def simulations(self) -> int:
        return len(self.plans) * len(self.samples)

    def describe(self) -> str:
        took = f", roughly {_duration(self.seconds)}" if self.seconds >= 60 else ""
        return (
            f"{self.layouts} layouts use the GPUs, {self.feasible} fit in memory; simulating "
            f"{len(self.plans)} on {len(self.samples)} batch(es) of {max(self.samples):,} "
            f"samples ({self.simulations} simulations{took})"
        )


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


Simulate = Callable[..., Any]
"""`sim.simulator.simulate`'s signature: (batch, assignment, spec, plan, hardware, cost unit,
record_events) -> a result with `iter_time`. The planner takes it as an argument: plan/ and
sim/ sit side by side in the layers, neither importing the other."""


class Planner:
    """Plans, simulates and caches assignments; one instance per (model, batches, hardware)."""

    def __init__(
        self,
        spec: ModelSpec,
        batches: list[CostedBatch],
        hw: Hardware,
        cfg: PlannerConfig,
        *,
        simulate: Simulate,
    ):
        if not batches:
            raise ValueError("the planner needs at least one global batch")
        self.spec, self.batches, self.hw, self.cfg = spec, batches, hw, cfg
        self.cost_unit = common_unit(batches)
        self._simulate = simulate
        self._assignments: dict[tuple, Assignment] = {}

    def estimate(self, plan: ParallelPlan, work: dict[str, float]) -> float:
        units = {
            e: float(np.mean([len(b.units[e]) for b in self.batches])) for e in plan.encoder_tp
        }
        return estimate_time(self.spec, plan, work, self.hw, self.seconds, units)

    def seconds(self, work: float, tp: int) -> float:
        return self.hw.seconds(work, self.cost_unit, tp)

    def assignment(self, i: int, plan: ParallelPlan, policy: str) -> Assignment:
        """Batch i's assignment under `plan` and `policy`, as the run's step recipe makes it
        (Entrain with the plan's lookahead and pool)."""
        knobs = (
            (plan.encoder_lookahead, plan.encoder_pool, plan.encoder_order)
            if policy == "entrain"
            else (None, None, "light-first")
        )
        key = (i, plan.dp, plan.microbatches, policy, *knobs)
        if key not in self._assignments:
            recipe = StepRecipe(
                self.spec,
                self.cfg.global_batch,
                plan.dp,
                plan.microbatches,
                policy,
                lookahead=knobs[0],
                pool=knobs[1],
                order=knobs[2],
            )
            self._assignments[key] = recipe.assign(self.batches[i])
        return self._assignments[key]

    def simulate(self, i: int, plan: ParallelPlan, policy: str, record_events: bool = False):
        """Batch i under `plan` and `policy`, by the simulator the planner was given."""
        asg = self.assignment(i, plan, policy)
        return self._simulate(self.batches[i], asg, self.spec, plan, self.hw, record_events)

    def feasible(
        self, plans: list[ParallelPlan], lookahead: int | None | str = "plan"
    ) -> list[ParallelPlan]:
        """Plans whose every GPU fits in memory on the heaviest sampled batch, for
        microbatches as large as a balanced assignment makes them: the mean, or the largest
        indivisible piece (a sample for the LLM, a unit for an encoder), plus 10%. Encoder
        activations in flight follow the deferral depth: `lookahead`, or by default the
        plan's own for Entrain and none for the policies that never defer."""
        out = []
        worst = max(self.batches, key=lambda b: float(b.llm_tokens.sum()))
        tokens = {"llm": worst.llm_tokens, **{e: u.tokens for e, u in worst.units.items()}}
        for plan in plans:
            B = plan.dp * plan.microbatches
            per_mb = {
                m: 1.1 * max(float(t.sum()) / B, float(t.max(initial=0))) for m, t in tokens.items()
            }
            ahead = lookahead
            if ahead == "plan":
                ahead = plan.encoder_lookahead if self.cfg.policy == "entrain" else 0
            settings = dataclasses.replace(self.cfg.memory, lookahead=ahead)
            mem = plan_memory(self.spec, plan, per_mb, settings=settings)
            if max(mem.values()) <= self.hw.memory_bytes * self.cfg.memory_headroom:
                out.append(plan)
        return out

    def search(self) -> Search:
        """The plans `plan` will simulate, ranked by the closed-form estimate, and how long
        that should take; narrowed to fit `cfg.search_budget` when it would take longer."""
        cfg = self.cfg
        candidates = enumerate_plans(self.spec, cfg, self.hw.gpus_per_node)
        if not candidates:
            raise ValueError(
                f"no plan uses exactly {cfg.gpus} GPUs: {self.spec.name} needs at least "
                f"{len(self.spec.encoders) + 1} per replica (one per encoder and the LLM)"
            )
        variants = cfg.entrain_variants if cfg.policy == "entrain" else None
        # a layout is a candidate when its least deferring variant fits; each variant is
        # then checked with its own depth (see _Choice.fits)
        least = min((a for a, _, _ in variants if a is not None), default=None) if variants else 0
        plans = self.feasible(candidates, lookahead=least)
        if not plans:
            raise ValueError(
                f"no plan for {cfg.gpus} GPUs fits {self.hw.name} memory "
                f"({self.hw.memory_bytes / 1e9:.0f} GB); try more GPUs or a smaller global batch"
            )
        mean_work = self._mean_work()
        scored = sorted(plans, key=lambda p: self.estimate(p, mean_work))
        # the oracle may prefer, for one batch, a plan the mean ranks lower: shortlist per batch too
        extra: dict[str, ParallelPlan] = {}
        for b in self.batches:
            work = _module_totals(b)
            for p in sorted(plans, key=lambda p: self.estimate(p, work))[:2]:
                extra.setdefault(p.describe(), p)
        fits = (lambda p: bool(self.feasible([p]))) if variants else (lambda p: True)
        whole = _Choice(scored[: cfg.shortlist], list(extra.values()), variants, fits)
        choice, narrowed = whole, None
        whole_s = self.search_seconds(whole.plans())
        if whole_s > cfg.search_budget:
            choice = self._narrowed(whole)
            narrowed = self._say_narrowed(whole, choice, whole_s)
        n_static = choice.n_static
        chosen = choice.plans()
        return Search(
            layouts=len(candidates),
            feasible=len(plans),
            plans=chosen,
            n_static=n_static,
            samples=[b.n_samples for b in self.batches],
            seconds=self.search_seconds(chosen),
            narrowed=narrowed,
        )

    def _say_narrowed(self, whole: _Choice, choice: _Choice, whole_s: float) -> str:
        """One line: the whole search's size and time, and what is simulated instead."""
        kept = f"the {len(choice.static)} best-ranked plan(s) by the closed-form estimate"
        if choice.variants and len(choice.variants) < len(whole.variants or ()):
            kept += f", with {len(choice.variants)} of {len(whole.variants)} Entrain variants"
        if len(whole.plans()) > len(whole.cut(whole.static).plans()):
            kept += ", no extra plans for the oracle"
        said = (
            f"--gpus {self.cfg.gpus}: the whole search ({len(whole.plans())} plans on "
            f"{len(self.batches)} batch(es)) would take roughly {_duration(whole_s)}; "
            f"narrowed to {kept}"
        )
        left = self.search_seconds(choice.plans())
        if left > self.cfg.search_budget:
            said += (
                f" (still roughly {_duration(left)}: a smaller --global-batch or fewer "
                "--iterations is faster)"
            )
        return said

    def _mean_work(self) -> dict[str, float]:
        return {
            m: float(np.mean([_module_totals(b)[m] for b in self.batches]))
            for m in self.spec.modules
        }

    def _narrowed(self, whole: _Choice) -> _Choice:
        """The largest cut of the search within budget: first without the oracle's extra
        candidates, then fewer shortlisted plans, then fewer Entrain variants (at least the
        best-ranked plan with the first variant)."""
        static, variants = whole.static, whole.variants
        tries = [whole.cut(static[:k]) for k in range(len(static), 0, -1)]
        if variants:
            fewer = range(len(variants) - 1, 0, -1)
            tries += [whole.cut(static[:1], variants[:v]) for v in fewer]
        for c in tries:
            if self.search_seconds(c.plans()) <= self.cfg.search_budget:
                return c
        return tries[-1]

    def search_seconds(self, plans: list[ParallelPlan]) -> float:
        """Rough seconds to simulate `plans` on every batch with the planner's policy: an
        assignment per (batch, replicas, microbatches, variant), a simulation per plan."""
        keys = {
            (p.dp, p.microbatches, p.encoder_lookahead, p.encoder_pool, p.encoder_order)
            for p in plans
        }
        n = sum(b.n_samples for b in self.batches)
        t = sum(n * (ASSIGN_S_PER_SAMPLE + dp * ASSIGN_S_PER_SAMPLE_REPLICA) for dp, *_ in keys)
        for p in plans:
            stages = p.llm_pp + len(p.encoder_tp)
            t += len(self.batches) * p.dp * p.microbatches * stages * SIM_S_PER_STAGE_MICROBATCH
        return t

    def plan(
        self, on_progress: Callable[[int], None] | None = None, search: Search | None = None
    ) -> PlanResult:
        """Simulate the plans of `search` (default: `self.search()`) on every batch, calling
        `on_progress(1)` per simulation; keep the static plan with the best throughput."""
        cfg = self.cfg
        search = search or self.search()
        mean_work = self._mean_work()
        evaluated = []
        for plan in search.plans:
            ev = Evaluated(plan=plan, estimate=self.estimate(plan, mean_work))
            for i in range(len(self.batches)):
                ev.iter_times.append(self.simulate(i, plan, cfg.policy).iter_time)
                if on_progress:
                    on_progress(1)
            evaluated.append(ev)
        samples = [b.n_samples for b in self.batches]
        static = max(evaluated[: search.n_static], key=lambda e: e.throughput(samples))
        best = [min(evaluated, key=lambda e: e.iter_times[i]) for i in range(len(self.batches))]
        return PlanResult(
            static=static,
            oracle_times=[e.iter_times[i] for i, e in enumerate(best)],
            oracle_plans=[e.plan for e in best],
            samples=samples,
            simulated=evaluated,
            feasible=search.feasible,
            narrowed=search.narrowed,
        )

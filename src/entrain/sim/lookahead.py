"""Entrain's deferral depth for a fixed plan, chosen by simulating the candidates (the
runtime's `--lookahead auto` with a profile)."""

from __future__ import annotations

from entrain.cost.batch import CostedBatch
from entrain.cost.hardware import Hardware
from entrain.schedule.parallel import ParallelPlan
from entrain.schedule.steps import StepRecipe
from entrain.sim.simulator import simulate


def choose_lookahead(
    recipe: StepRecipe,
    batches: list[CostedBatch],
    plan: ParallelPlan,
    hw: Hardware,
    candidates: tuple[int | None, ...] = (0, 1, 2, None),
) -> tuple[int | None, dict]:
    """Entrain's deferral depth for a fixed plan: the candidate with the least simulated
    time over `batches` (ties go to the shallower, which holds fewer embeddings). The
    recipe's pool and deferral cap hold for every candidate. Returns (depth, {depth: time})."""
    recipe = recipe.replace(policy="entrain", dp=plan.dp, microbatches=plan.microbatches)
    times = {}
    for a in candidates:
        depth = recipe.replace(lookahead=a)
        times[a] = sum(
            simulate(b, depth.assign(b), recipe.spec, plan, hw).iter_time for b in batches
        )
    best = min(candidates, key=lambda a: (round(times[a], 9), 99 if a is None else a))
    return best, times

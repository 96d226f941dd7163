"""What `entrain plan` and `entrain simulate` do, as functions returning plain data: the
planner wired to the simulator (plan/ and sim/ do not import each other), batches read
from a manifest."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from entrain.cost.batch import CostedBatch, cost_batch
from entrain.cost.flops import CostModel, analytic_cost_model
from entrain.cost.hardware import Hardware
from entrain.models.spec import ModelSpec
from entrain.plan.planner import Planner, PlannerConfig, PlanResult
from entrain.schedule.parallel import ParallelPlan
from entrain.sim.simulator import SimResult, simulate
from entrain.workload.manifest import ShortManifestError, global_batches


def load_batches(
    manifest: str | os.PathLike,
    spec: ModelSpec,
    global_batch: int,
    iterations: int,
    cost_model: CostModel | None = None,
    seed: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> list[CostedBatch]:
    """The first `iterations` full global batches of a manifest, costed; a ShortManifestError
    when the manifest cannot fill one (a plan for a batch it never saw would mislead).
    `on_progress(n)` is called as samples are read."""
    model = cost_model or analytic_cost_model(spec)
    out = []
    for w in global_batches(manifest, global_batch, iterations, seed, on_progress):
        if len(w) < global_batch:
            if not out:
                raise ShortManifestError(manifest, len(w), global_batch)
            break
        out.append(cost_batch(w, spec, model))
    return out


def run_plan(
    spec: ModelSpec,
    batches: list[CostedBatch],
    hw: Hardware,
    cfg: PlannerConfig,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[Planner, PlanResult]:
    planner = make_planner(spec, batches, hw, cfg)
    return planner, planner.plan(on_progress)


def make_planner(
    spec: ModelSpec,
    batches: list[CostedBatch],
    hw: Hardware,
    cfg: PlannerConfig,
) -> Planner:
    """A planner that simulates with the discrete-event simulator (in the batches' unit)."""
    return Planner(spec, batches, hw, cfg, simulate=simulate)


def policy_planners(
    spec: ModelSpec,
    batches: list[CostedBatch],
    hw: Hardware,
    cfg: PlannerConfig,
    policies: tuple[str, ...],
) -> dict[str, Planner]:
    """One planner per policy, each searching with its own policy, all over the same costed
    batches (read and costed once): a policy judged on a plan chosen for another policy is
    judged unfairly, so `entrain plan --compare` gives each its own best plan."""
    return {
        p: make_planner(spec, batches, hw, dataclasses.replace(cfg, policy=p)) for p in policies
    }


def compare_policies(results: dict[str, PlanResult]) -> dict:
    """Each policy at its own best static plan (`results`: policy -> its planner's result),
    side by side: the plan, mean iteration time, throughput and speed-up over every other
    policy; the best baseline (the fastest policy other than Entrain, at its own plan) and
    Entrain's throughput over it (None without both)."""
    out: dict[str, dict] = {}
    for p, r in results.items():
        out[p] = {
            "plan": r.static.plan.to_dict(),
            "plan_description": r.static.plan.describe(),
            "iter_time": float(np.mean(r.static.iter_times)),
            "throughput": {"samples_per_s": r.static_throughput},
            "static_over_oracle": r.static_over_oracle,
            "search_narrowed": r.narrowed,
        }
    _add_speedups(out)
    baselines = [p for p in out if p != "entrain"]
    best = max(baselines, key=lambda p: out[p]["throughput"]["samples_per_s"], default=None)
    gain = None
    if best is not None and "entrain" in out:
        gain = out["entrain"]["speedup"][best]
    return {"policies": out, "best_baseline": best, "entrain_over_best_baseline": gain}


def _add_speedups(out: dict[str, dict]) -> None:
    """Each policy's `speedup` over every other: its samples/s over theirs."""
    for p, m in out.items():
        m["speedup"] = {
            b: m["throughput"]["samples_per_s"] / out[b]["throughput"]["samples_per_s"]
            for b in out
            if b != p
        }


def simulate_policies(
    planner: Planner, plan: ParallelPlan, policies: tuple[str, ...], trace_policy: str | None = None
) -> tuple[dict, list]:
    """Mean iteration time, throughput and bubbles of each policy under one plan, and the
    events of the first batch under `trace_policy` (for a Chrome trace)."""
    out: dict[str, dict] = {}
    events: list = []
    for p in policies:
        runs: list[SimResult] = []
        for i in range(len(planner.batches)):
            r = planner.simulate(i, plan, p, record_events=(p == trace_policy and i == 0))
            if r.events:
                events = r.events
            runs.append(r)
        t = sum(r.iter_time for r in runs)
        out[p] = {
            "iter_time": t / len(runs),
            "throughput": {
                "samples_per_s": sum(r.samples for r in runs) / t,
                "tokens_per_s": sum(r.tokens for r in runs) / t,
            },
            "bubble_fraction": float(np.mean([r.bubble_fraction for r in runs])),
            "peak_deferred_tokens": float(max(r.peak_deferred_tokens for r in runs)),
        }
    _add_speedups(out)
    return out, events

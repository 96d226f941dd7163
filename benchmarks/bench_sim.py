"""Simulator speed at scale: 1024 GPUs, 64 microbatches per replica (budget: 2 s an
iteration), and how each policy fares there.

Plan: 32 replicas x (LLM 4 stages x TP4, vision 4 copies of TP2, audio 4 copies of TP2).
"""

from __future__ import annotations

import sys
import time

from results import Section  # benchmarks/results.py: docs/results.md

from entrain.cost import cost_batch
from entrain.cost.hardware import HARDWARE
from entrain.models import load_spec
from entrain.schedule import assign
from entrain.schedule.parallel import ParallelPlan
from entrain.sim import simulate
from entrain.workload.traces import generate_workload

BUDGET_S = 2.0

INTRO = (
    "One iteration of the omni trace on 1024 simulated H100s (`benchmarks/bench_sim.py`):"
    " how long the policy and the discrete-event simulator take, and each policy's "
    "simulated throughput."
)


def main() -> int:
    out = Section("Simulator at scale", INTRO, markdown=False)
    plan = ParallelPlan(
        dp=32,
        llm_pp=4,
        llm_tp=4,
        microbatches=64,
        encoder_tp={"vision": 2, "audio": 2},
        encoder_dp={"vision": 4, "audio": 4},
    )
    n = plan.dp * plan.microbatches * 2
    spec = load_spec("omni-7b")
    batch = cost_batch(generate_workload("omni", n, seed=0), spec)
    out.print(f"simulator at scale: {plan.describe()}, omni trace, {n} samples")
    worst = 0.0
    base = None
    runs = [
        ("sequential", None, None),
        ("llm-balanced", None, None),
        ("encoder-rebalance", None, None),
        ("entrain", None, None),
        ("entrain", 1, 1),
    ]
    for policy, ahead, pool in runs:
        t0 = time.perf_counter()
        asg = assign(policy, batch, plan.dp, plan.microbatches, ahead, pool)
        t1 = time.perf_counter()
        r = simulate(batch, asg, spec, plan, HARDWARE["h100"])
        t2 = time.perf_counter()
        worst = max(worst, t2 - t1)
        base = base or r.samples_per_s
        name = policy if ahead is None else f"{policy} (ahead={ahead}, pool={pool})"
        out.print(
            f"  {name:32s} assign {1000 * (t1 - t0):6.1f} ms  simulate {t2 - t1:5.2f} s  "
            f"iter {r.iter_time:6.3f} s  {r.samples_per_s:7.1f} samples/s "
            f"({r.samples_per_s / base:.2f}x)"
        )
    ok = worst < BUDGET_S
    verdict = "PASS" if ok else "FAIL"
    out.print(
        f"slowest simulation {worst:.2f} s per iteration: {verdict} (budget {BUDGET_S:.0f} s)"
    )
    out.save()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

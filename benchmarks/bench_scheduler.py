"""Scheduler latency: one global batch of 4096 samples, D=8 replicas, M=16 microbatches.

Entrain runs on the critical path of every iteration (every rank computes the assignment),
so it must stay well under the time of a training step: the budget is 50 ms on one core.
Runs pinned to one CPU; prints the median of several runs per policy and trace.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from results import Section  # benchmarks/results.py: docs/results.md

from entrain.cost import cost_batch
from entrain.models import load_spec
from entrain.schedule import POLICIES, evaluate
from entrain.workload.traces import TRACE_MODELS, generate_workload

N, D, M, REPEAT, BUDGET_MS = 4096, 8, 16, 7, 50.0


def median_ms(fn, batch) -> float:
    fn(batch, D, M)  # warm-up
    runs = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        fn(batch, D, M)
        runs.append(1000 * (time.perf_counter() - t0))
    return statistics.median(runs)


INTRO = (
    "Every policy's time to assign one global batch of 4096 samples (D=8, M=16), pinned "
    "to one core, median of 7 runs (`benchmarks/bench_scheduler.py`); the last column is "
    "the spread (worst_cv) Entrain removes against sequential packing."
)


def main() -> int:
    out = Section("Scheduler latency", INTRO, markdown=False)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    out.print(f"scheduler latency, {N} samples, D={D}, M={M}, one core, median of {REPEAT} (ms)")
    names = list(POLICIES)
    out.print(
        f"{'trace':16s} {'units':>8s} "
        + " ".join(f"{p:>17s}" for p in names)
        + "  entrain/joint  worst_cv seq/entrain"
    )
    worst = 0.0
    for kind, model in TRACE_MODELS.items():
        batch = cost_batch(generate_workload(kind, N, seed=1), load_spec(model))
        ms = {p: median_ms(POLICIES[p], batch) for p in names}
        cv = {
            p: evaluate(batch, POLICIES[p](batch, D, M)).worst_cv for p in ("sequential", "entrain")
        }
        units = sum(len(u) for u in batch.units.values())
        worst = max(worst, ms["entrain"])
        out.print(
            f"{kind:16s} {units:8d} "
            + " ".join(f"{ms[p]:17.1f}" for p in names)
            + f"  {ms['entrain'] / ms['joint']:13.1f}x"
            + f"  {cv['sequential'] / max(cv['entrain'], 1e-12):8.1f}x"
        )
    ok = worst < BUDGET_MS
    verdict = "PASS" if ok else "FAIL"
    out.print(
        f"entrain worst case {worst:.1f} ms per global batch: {verdict} (budget {BUDGET_MS:.0f} ms)"
    )
    out.save()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

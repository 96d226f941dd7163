"""Scheduler latency: one global batch of 4096 samples, M=16 microbatches, D=8 and D=128.

Entrain runs on the critical path of every iteration (every rank computes the assignment),
so it must stay well under the time of a training step. The budget on one core is 20 ms at
D=8 replicas and 150 ms at D=128 (32 samples per replica, 2 per microbatch: 2048 bins
between which the repair moves units). Runs pinned to one CPU; prints the median of several
runs per policy and trace, and exits 1 when Entrain's worst case is over a budget.
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

N, M, REPEAT = 4096, 16, 7
BUDGETS_MS = {8: 20.0, 128: 150.0}  # replicas -> Entrain's budget per global batch


def median_ms(fn, batch, D: int) -> float:
    fn(batch, D, M)  # warm-up
    runs = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        fn(batch, D, M)
        runs.append(1000 * (time.perf_counter() - t0))
    return statistics.median(runs)


INTRO = (
    "Every policy's time to assign one global batch of 4096 samples (M=16; D=8, then "
    "D=128), pinned to one core, median of 7 runs (`benchmarks/bench_scheduler.py`); the "
    "last column is the spread (worst_cv) Entrain removes against sequential packing."
)


def table(out: Section, batches: dict, D: int) -> bool:
    """One table of every policy on every trace at D replicas; whether Entrain's worst
    case is within its budget."""
    budget = BUDGETS_MS[D]
    out.print(f"scheduler latency, {N} samples, D={D}, M={M}, one core, median of {REPEAT} (ms)")
    names = list(POLICIES)
    out.print(
        f"{'trace':16s} {'units':>8s} "
        + " ".join(f"{p:>17s}" for p in names)
        + "  entrain/joint  worst_cv seq/entrain"
    )
    worst = 0.0
    for kind, batch in batches.items():
        ms = {p: median_ms(POLICIES[p], batch, D) for p in names}
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
    ok = worst <= budget
    verdict = "PASS" if ok else "FAIL"
    out.print(
        f"entrain worst case at D={D}: {worst:.1f} ms per global batch: {verdict} "
        f"(budget {budget:.0f} ms)"
    )
    return ok


def main() -> int:
    out = Section("Scheduler latency", INTRO, markdown=False)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    batches = {
        kind: cost_batch(generate_workload(kind, N, seed=1), load_spec(model))
        for kind, model in TRACE_MODELS.items()
    }
    ok = True
    for i, D in enumerate(BUDGETS_MS):
        if i:
            out.print("")
        ok = table(out, batches, D) and ok
    out.save()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

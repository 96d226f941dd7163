"""Simulated throughput of every policy, each at its own best static plan (`entrain plan
--compare`), for the issue's matrix: traces x {32, 128} GPUs x {wide, narrow} microbatches,
as a Markdown table.

Equivalent to, per row:
    entrain trace generate --kind KIND --n 4*16*G --seed 0 -o T.jsonl
    entrain plan T.jsonl --model MODEL --gpus G --microbatch-size S --iterations 4 --compare
(global batch 16 samples per GPU; the video trace uses 4 samples per microbatch in the
wide regime, as 16 of its samples do not fit any plan's memory).
"""

from __future__ import annotations

import sys
import time

from results import Section  # benchmarks/results.py: docs/results.md

from entrain.cost import cost_batch
from entrain.cost.hardware import HARDWARE
from entrain.models import load_spec
from entrain.plan.planner import PlannerConfig
from entrain.planning import compare_policies, policy_planners
from entrain.schedule import POLICIES
from entrain.workload.traces import TRACE_MODELS, generate_workload

K = 4

INTRO = (
    "For each trace, cluster size and microbatch size, every policy planned at its own best "
    "static plan (`entrain plan --compare`; `benchmarks/sim_eval.py`, H100 model, FLOPs "
    "costs, fair encoder copies). Throughput relative to sequential at its plan; then "
    "Entrain's plan, and Entrain over the best baseline (named)."
)


def main(kinds: list[str]) -> int:
    out = Section("Simulated throughput, each policy at its own plan", INTRO, markdown=True)
    names = list(POLICIES)
    out.print(
        "| trace | GPUs | mb size | "
        + " | ".join(names)
        + " | entrain's plan | entrain vs best baseline |"
    )
    out.print("|---" * (len(names) + 5) + "|")
    for kind in kinds:
        spec = load_spec(TRACE_MODELS[kind])
        for gpus in (32, 128):
            gb = 16 * gpus
            w = generate_workload(kind, gb * K, 0)
            batches = [cost_batch(w.slice(i * gb, (i + 1) * gb), spec) for i in range(K)]
            for mbs in (16.0, 2.0):
                mbs = 4.0 if kind == "video" and mbs > 4 else mbs
                t0 = time.time()
                cfg = PlannerConfig(gpus=gpus, global_batch=gb, microbatch_samples=mbs)
                results = {}
                for p, planner in policy_planners(spec, batches, HARDWARE["h100"], cfg,
                                                  tuple(names)).items():  # fmt: skip
                    try:
                        results[p] = planner.plan()
                    except ValueError:  # the memory model finds no layout that fits
                        pass
                if "entrain" not in results:
                    out.print(f"| {kind} | {gpus} | {mbs:.0f} | no plan of entrain fits |"
                              + " |" * (len(names) + 1))  # fmt: skip
                    continue
                c = compare_policies(results)
                pol = c["policies"]
                seq = pol.get("sequential", pol["entrain"])["throughput"]["samples_per_s"]
                cells = [
                    f"{pol[p]['throughput']['samples_per_s'] / seq:.2f}x" if p in pol else "-"
                    for p in names
                ]
                out.print(
                    f"| {kind} | {gpus} | {mbs:.0f} | " + " | ".join(cells)
                    + f" | {pol['entrain']['plan_description']} | "
                    f"{c['entrain_over_best_baseline']:.3f} ({c['best_baseline']}) |"
                )  # fmt: skip
                print(f"    ({time.time() - t0:.0f} s)", file=sys.stderr)
    out.save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["interleaved", "omni", "video"]))

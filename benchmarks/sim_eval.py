"""Simulated throughput of every policy on the plan `entrain plan` picks, for the issue's
matrix: traces x {32, 128} GPUs x {wide, narrow} microbatches, as a Markdown table.

Equivalent to, per row:
    entrain trace generate --kind KIND --n 4*16*G --seed 0 -o T.jsonl
    entrain simulate T.jsonl --model MODEL --gpus G --microbatch-size S --iterations 4 --json
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
from entrain.planning import run_plan, simulate_policies
from entrain.schedule import POLICIES
from entrain.workload.traces import TRACE_MODELS, generate_workload

K = 4

INTRO = (
    "For each trace, cluster size and microbatch size, `entrain plan` picks a static plan"
    " for Entrain and `entrain simulate` runs every policy on it "
    "(`benchmarks/sim_eval.py`, H100 model, FLOPs costs). Throughput relative to "
    "sequential packing; the last column is Entrain over the best baseline."
)


def main(kinds: list[str]) -> int:
    out = Section("Simulated throughput on the planner's plan", INTRO, markdown=True)
    names = list(POLICIES)
    out.print(
        "| trace | GPUs | mb size | plan (chosen for entrain) | static/oracle | "
        + " | ".join(names)
        + " | entrain vs best baseline |"
    )
    out.print("|---" * (len(names) + 6) + "|")
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
                try:
                    planner, res = run_plan(spec, batches, HARDWARE["h100"], cfg)
                except ValueError as err:  # the memory model finds no layout that fits
                    out.print(f"| {kind} | {gpus} | {mbs:.0f} | {err} |" + " |" * (len(names) + 2))
                    continue
                sims, _ = simulate_policies(planner, res.static.plan, tuple(names))
                thr = {p: sims[p]["throughput"]["samples_per_s"] for p in names}
                best = max(v for p, v in thr.items() if p != "entrain")
                cells = [f"{thr[p] / thr['sequential']:.2f}x" for p in names]
                out.print(
                    f"| {kind} | {gpus} | {mbs:.0f} | {res.static.plan.describe()} | "
                    f"{res.static_over_oracle:.3f} | "
                    + " | ".join(cells)
                    + f" | {thr['entrain'] / best:.3f} |"
                )
                print(f"    ({time.time() - t0:.0f} s)", file=sys.stderr)
    out.save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["interleaved", "omni", "video"]))

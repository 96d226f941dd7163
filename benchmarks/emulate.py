"""The real runtime at paper-like layouts on an emulated device, against the simulator.

`entrain train --device emulate` runs every rank, the plan-ahead thread, the step program,
the p2p protocol over gloo, the gradient all-reduce and checkpoints for real, with no model:
each compute sleeps the simulator's duration for it on an H100 x --time-scale
(runtime/emulate.py). So the emulated step time can differ from the simulated one only by
what the runtime itself does: waiting, messages, its own overheads, here on however few
cores this machine has for all the ranks. For an omni-like generated trace (sizes only),
every policy trains a few steps at 8, 16 and 32 ranks; each step is replayed in the
simulator (`entrain runs --simulate`'s replay), and the medians after the warm-up steps
are compared, as is the ranking of the policies.

Not in `make bench` (it takes about 20 minutes on 2 cores): run it by hand,
`.venv/bin/python benchmarks/emulate.py [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results import Section  # benchmarks/results.py: docs/results.md

from entrain.sim.replay import replay_run
from entrain.workload.traces import write_trace

POLICIES = ("sequential", "llm-balanced", "encoder-rebalance", "entrain")
LAYOUTS = {
    # ranks: (dp, LLM stages, global batch, microbatches, --time-scale); per replica
    # vision, audio, stages. 32 processes on a few cores: every gloo hop and the step's
    # closing collectives cost milliseconds the emulated device would not spend, so the
    # 32-rank runs stretch the emulated compute twice as much to keep that small.
    8: (2, 2, 32, 4, 4),
    16: (2, 6, 64, 8, 4),
    32: (4, 6, 128, 8, 8),
}
STEPS, WARMUP, SAMPLES = 6, 2, 1024
TIE = 0.01
README = Path(__file__).resolve().parents[1] / "README.md"
INTRO = (
    "`entrain train --device emulate` (omni-7b's spec on emulated H100s, `--time-scale` as "
    "each layout says) on an omni trace of sizes only: the real runtime with every compute "
    "sleeping the simulator's time for it, against the simulator's replay of the same "
    "steps x the scale (`benchmarks/emulate.py`, run by hand). Medians over the steps after "
    f"{WARMUP} warm-up steps; every rank of a run shares this machine's cores. A step runs from "
    "its first rank's start to the closing collective; `between` is rank 0's time from one "
    "step's end to the next one's start (metrics, logging, checkpoints), not in the step."
)


def train(manifest: Path, out: Path, ranks: int, policy: str, steps: int) -> float:
    """One emulated run; its wall time, launch to exit."""
    dp, pp, gb, mb, scale = LAYOUTS[ranks]
    argv = [
        sys.executable, "-m", "entrain", "train", "--data", str(manifest), "--model", "omni-7b",
        "--device", "emulate", "--nproc", str(ranks), "--dp", str(dp), "--pp", str(pp),
        "--global-batch", str(gb), "--microbatches", str(mb), "--policy", policy,
        "--steps", str(steps), "--timeout", "300", "--out", str(out), "--time-scale", str(scale),
    ]  # fmt: skip
    t0 = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(argv, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{policy} at {ranks} ranks failed:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0


def ranking(times: dict[str, float]) -> str:
    return " < ".join(sorted(times, key=times.get))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 ranks only, 4 steps")
    ap.add_argument("--no-save", action="store_true", help="print only (no docs/results.md)")
    args = ap.parse_args()
    layouts = [16] if args.quick else list(LAYOUTS)
    steps = 4 if args.quick else STEPS
    out = Section("Emulated cluster: the runtime against the simulator", INTRO)
    worst: dict[int, float] = {}
    table: dict[int, dict[str, tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = tmp / "omni.jsonl"
        write_trace("omni", SAMPLES, 0, manifest)
        for ranks in layouts:
            dp, pp, gb, mb, scale = LAYOUTS[ranks]
            out.print(
                f"{ranks} ranks: dp {dp} x [vision, audio, {pp} LLM stages], global batch "
                f"{gb} in {mb} microbatches, {steps} steps, --time-scale {scale:g}"
            )
            out.print(
                f"  {'policy':18s} {'emulated (s)':>12s} {'simulated (s)':>13s} {'error':>7s}"
                f" {'busy/sim':>8s} {'plan wait':>9s} {'between':>8s} {'wall (s)':>8s}"
            )
            meas, sim = {}, {}
            for p in POLICIES:
                run = tmp / f"{ranks}-{p}"
                wall = train(manifest, run, ranks, p, steps)
                rep = replay_run(run, warmup=WARMUP)
                meas[p], sim[p] = rep.measured, rep.simulated
                rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
                rows = rows[WARMUP:]
                # busy time over the simulator's (the sleeps plus the per-call overheads)
                ratio = statistics.median(
                    sum(s.measured_busy.values()) / sum(s.simulated_busy.values())
                    for s in rep.steady
                )
                wait = statistics.median(r["plan_wait"] for r in rows)
                # rank 0's time between steps (metrics, logging, checkpoints): outside
                # the step time, shown so that nothing the loop spends is hidden
                between = statistics.median(r["between_steps"] for r in rows)
                out.print(
                    f"  {p:18s} {meas[p]:12.3f} {sim[p]:13.3f} {100 * rep.error:+6.1f}% "
                    f"{ratio:8.3f} {1e3 * wait:7.1f}ms {1e3 * between:6.0f}ms {wall:8.0f}"
                )
                worst[ranks] = max(worst.get(ranks, 0.0), abs(rep.error))
            table[ranks] = {p: (meas[p], sim[p]) for p in POLICIES}
            out.print(f"  ranking, fastest first: emulated  {ranking(meas)}")
            out.print(f"                          simulated {ranking(sim)}")
            pairs = [(p, q) for p in POLICIES for q in POLICIES if sim[p] < sim[q] * (1 - TIE)]
            wrong = [(p, q) for p, q in pairs if meas[p] >= meas[q]]
            out.print(
                f"  worst error {100 * worst[ranks]:.1f}%; {len(pairs) - len(wrong)} of "
                f"{len(pairs)} pairs the simulator separates by more than {100 * TIE:.0f}% "
                "come out in the same order"
            )
    if not args.no_save:
        out.save()
        write_readme(table)
    return 0


def write_readme(table: dict[int, dict[str, tuple[float, float]]]) -> None:
    """The README's table of emulated against simulated step times, between its markers."""
    start, end = "<!-- emulate:start -->", "<!-- emulate:end -->"
    text = README.read_text(encoding="utf-8")
    if start not in text or end not in text:
        print(f"{README}: no {start} block; table not written", file=sys.stderr)
        return
    head = "| ranks | " + " | ".join(POLICIES) + " |"
    lines = [head, "|---" * (len(POLICIES) + 1) + "|"]
    for ranks, row in table.items():
        cells = [f"{m:.2f} s (sim {s_:.2f})" for m, s_ in (row[p] for p in POLICIES)]
        lines.append(f"| {ranks} | " + " | ".join(cells) + " |")
    body = "\n".join([start, *lines, end])
    README.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), body, text, flags=re.S))
    print(f"wrote the emulated-cluster table of {README}")


if __name__ == "__main__":
    sys.exit(main())

"""Does the simulator predict the real runtime, and is entrain ahead for real? Profile the
tiny model on this machine, train it with every policy for real (CPU, gloo, 2 ranks each
pinned to a core, the assignment balancing the profile's measured costs), replay every
step of every run in the simulator with the same profile, and compare median iteration
times; also the measured throughput of entrain against each baseline.

The data: demo images of 100-400 px, 0-3 per sample, and 30% of captions with a long
description, so LLM work varies apart from the images. Each round profiles afresh and then
runs every policy, so drift of a shared machine hits a round's profile and runs alike.
Steps of the first epoch are left out of both medians: they decode the PNG files (later
epochs hit the cache), which the simulator does not model.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results import Section  # benchmarks/results.py: docs/results.md

from entrain.config import read_run_config
from entrain.runtime.demo_data import make_demo_data
from entrain.sim.replay import replay_run

POLICIES = ("sequential", "llm-balanced", "encoder-rebalance", "entrain")
ROUNDS, STEPS, SAMPLES, GLOBAL_BATCH, MICROBATCHES = 3, 24, 256, 32, 8
EPOCH = SAMPLES // GLOBAL_BATCH
TIE = 0.005
SPEC = Path(__file__).with_name("tiny-vision.yaml")


def entrain(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "entrain", *args], check=True, capture_output=True)


INTRO = (
    "The tiny model trained for real on this machine's CPU with every policy (2 ranks, "
    "gloo), each step replayed in the simulator with a profile measured just before "
    "(`benchmarks/sim_vs_real.py`)."
)


def main() -> int:
    out = Section("Simulator against the real runtime", INTRO, markdown=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = make_demo_data(
            tmp / "data", SAMPLES, seed=2, audio_share=0.0, long_text=0.3, sides=(100, 400)
        )
        measured = {p: [] for p in POLICIES}
        simulated = {p: [] for p in POLICIES}
        lookahead = []
        for r in range(ROUNDS):
            profile = tmp / f"profile-{r}.json"
            entrain(
                "profile", "--model", str(SPEC), "--data", str(manifest), "--nproc", "2",
                "--pin-cores", "-o", str(profile),
            )  # fmt: skip
            for p in POLICIES:
                run_dir = tmp / f"{p}-{r}"
                entrain(
                    "train", "--model", str(SPEC), "--data", str(manifest), "--policy", p,
                    "--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH),
                    "--microbatches", str(MICROBATCHES), "--nproc", "2", "--pin-cores",
                    "--profile", str(profile), "--out", str(run_dir),
                )  # fmt: skip
                rep = replay_run(run_dir, warmup=EPOCH)
                measured[p] += [s.measured for s in rep.steady]
                simulated[p] += [s.simulated for s in rep.steady]
                if p == "entrain":
                    lookahead.append(read_run_config(run_dir).config.lookahead)
        prof = json.loads(profile.read_text())
    meas = {p: statistics.median(v) for p, v in measured.items()}
    sim = {p: statistics.median(v) for p, v in simulated.items()}
    out.print(
        f"tiny-vision on this CPU, 2 ranks (gloo, pinned), global batch {GLOBAL_BATCH} in "
        f"{MICROBATCHES} microbatches; {ROUNDS} rounds x {STEPS - EPOCH} steps after the "
        f"first epoch; last profile's fit error (rms) "
        + ", ".join(
            f"{m} {k[0]} {100 * f['rel_rms']:.0f}%"
            for m, kinds in prof["modules"].items()
            for k, f in kinds.items()
        )
    )
    out.print(f"entrain's lookahead, chosen by --lookahead auto each round: {lookahead}")
    out.print(f"{'policy':18s} {'measured (s)':>12s} {'simulated (s)':>13s} {'error':>7s}")
    worst = 0.0
    for p in POLICIES:
        err = (sim[p] - meas[p]) / meas[p]
        worst = max(worst, abs(err))
        out.print(f"{p:18s} {meas[p]:12.4f} {sim[p]:13.4f} {100 * err:+6.1f}%")
    out.print(f"worst error {100 * worst:.1f}% (target 10%)")
    out.print(f"ranking, fastest first: measured  {' < '.join(sorted(POLICIES, key=meas.get))}")
    out.print(f"                        simulated {' < '.join(sorted(POLICIES, key=sim.get))}")
    # a pair the simulator separates by more than TIE must come out in the same order
    pairs = [(p, q) for p in POLICIES for q in POLICIES if sim[p] < sim[q] * (1 - TIE)]
    wrong = [(p, q) for p, q in pairs if meas[p] >= meas[q]]
    ties = len(POLICIES) * (len(POLICIES) - 1) // 2 - len(pairs)
    out.print(
        f"rankings match: {not wrong} ({len(pairs) - len(wrong)} of {len(pairs)} ordered pairs "
        f"alike; {ties} pair(s) within {100 * TIE:.1f}% in the simulator count as ties)"
    )
    for p in POLICIES:
        if p != "entrain":
            out.print(
                f"measured throughput entrain / {p}: {meas[p] / meas['entrain']:.3f} "
                f"(simulated {sim[p] / sim['entrain']:.3f})"
            )
    out.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measured CPU pipeline throughput: the same tiny model and data, each policy, under
torchrun (gloo) on this machine, runs interleaved over several rounds so that drift of a
shared machine hits every policy alike. Prints samples/s and entrain's ratio to each.

Model: benchmarks/tiny-vision.yaml (the tiny preset without audio), 2 ranks (ViT, LLM),
global batch 32 in 8 microbatches, 16 steps a run (the first 3 are warm-up), 3 rounds, each
rank pinned to its own core.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from entrain.runtime.demo_data import make_demo_data

POLICIES = ("sequential", "llm-balanced", "encoder-rebalance", "entrain")
ROUNDS, STEPS, WARMUP = 3, 16, 3
SPEC = Path(__file__).with_name("tiny-vision.yaml")


def run(manifest: Path, out: Path, policy: str) -> float:
    cmd = [
        sys.executable,
        "-m",
        "entrain",
        "train",
        "--model",
        str(SPEC),
        "--data",
        str(manifest),
        "--policy",
        policy,
        "--steps",
        str(STEPS),
        "--global-batch",
        "32",
        "--microbatches",
        "8",
        "--nproc",
        "2",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["samples_per_s"] for r in rows[WARMUP:])


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_demo_data(Path(tmp) / "data", 256, seed=2, audio_share=0.0)
        speed = {p: [] for p in POLICIES}
        for r in range(ROUNDS):
            for p in POLICIES:
                speed[p].append(run(manifest, Path(tmp) / f"{p}-{r}", p))
    med = {p: statistics.median(v) for p, v in speed.items()}
    print(f"CPU runtime, 2 ranks (gloo), tiny-vision, {ROUNDS} rounds x {STEPS} steps")
    print("median samples/s per policy:")
    for p in POLICIES:
        runs = " ".join(f"{x:6.1f}" for x in speed[p])
        ratio = med["entrain"] / med[p]
        print(f"  {p:18s} {med[p]:7.1f}   (runs: {runs})   entrain / {p}: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

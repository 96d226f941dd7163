"""The wide and narrow regimes (docs/analysis.md) on every generated trace, as Markdown.

Equivalent to, for each trace:
    entrain trace generate --kind KIND --n 4096 --seed 0 -o out/traces/KIND.jsonl
    entrain analyze out/traces/KIND.jsonl --model MODEL --dp 4 --microbatches 8 \
        --global-batch 512 --iterations 8 --json          # wide
    entrain analyze ... --dp 8 --microbatches 32 ...      # narrow
"""

from __future__ import annotations

import sys
from pathlib import Path

from results import Section  # benchmarks/results.py: docs/results.md

from entrain.analyze import AnalyzeConfig, analyze
from entrain.models import load_spec
from entrain.schedule import POLICIES
from entrain.workload.traces import TRACE_MODELS, write_trace

REGIMES = {"wide": (4, 8), "narrow": (8, 32)}
N, GLOBAL_BATCH, SEED = 4096, 512, 0

INTRO = (
    "`entrain analyze` on 4096 samples of every synthetic trace "
    "(`benchmarks/regimes.py`): the worst per-module coefficient of variation of per-"
    "microbatch work, and the stretch (1.0: no imbalance bubbles)."
)


def main(folder: Path = Path("out/traces")) -> int:
    out = Section("Workload variability: wide and narrow regimes", INTRO, markdown=True)
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for kind, model in TRACE_MODELS.items():
        path = folder / f"{kind}.jsonl"
        write_trace(kind, N, SEED, path)
        for regime, (dp, m) in REGIMES.items():
            cfg = AnalyzeConfig(
                dp=dp, microbatches=m, global_batch=GLOBAL_BATCH, iterations=N // GLOBAL_BATCH
            )
            results[kind, regime] = analyze(path, load_spec(model), cfg)
    names = list(POLICIES)
    for regime, (dp, m) in REGIMES.items():
        out.print(
            f"\n{regime} regime: D={dp}, M={m}, global batch {GLOBAL_BATCH}, "
            f"{N // GLOBAL_BATCH} iterations\n"
        )
        out.print("worst_cv (lower is better); last column: sequential's worst_cv over entrain's\n")
        out.print("| trace | model | " + " | ".join(names) + " | seq/entrain |")
        out.print("|---" * (len(names) + 3) + "|")
        for kind, model in TRACE_MODELS.items():
            r = results[kind, regime]
            cells = [f"{r['policies'][p]['worst_cv']:.4f}" for p in names]
            out.print(
                f"| {kind} | {model} | "
                + " | ".join(cells)
                + f" | {r['cv_reduction']['sequential']:.1f}x |"
            )
        out.print("\nstretch (1.0: no imbalance bubbles) and entrain's worst bound_gap\n")
        out.print("| trace | " + " | ".join(names) + " | entrain bound_gap |")
        out.print("|---" * (len(names) + 2) + "|")
        for kind in TRACE_MODELS:
            r = results[kind, regime]
            cells = [f"{r['policies'][p]['stretch']:.4f}" for p in names]
            gap = max(r["policies"]["entrain"]["bound_gap"].values())
            out.print(f"| {kind} | " + " | ".join(cells) + f" | {100 * gap:.1f}% |")
    out.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

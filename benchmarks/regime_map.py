"""Where Entrain is worth it: its simulated gain over the best baseline, each policy at its
own best static plan (`entrain plan --compare`), across the regimes that decide it.

- Encoder/LLM compute ratio: the omni model (7B LLM, audio encoder) with its vision
  encoder replaced by ViTs of 0.3B to 6B parameters, trained or frozen, against samples
  per microbatch (1 to 32), on 32 simulated H100s: a grid.
- Modality mix: the project's trace kinds (omni: audio, images and video; interleaved:
  images and text, a third text-only; video; llava-instruct: one image each), each with its
  model, at 2 and 16 samples per microbatch.
- Cluster size: 32, 128 and 512 GPUs on the omni trace.

Each point plans every policy on the same costed batches (16 samples per GPU a batch,
2 batches) and compares their throughputs. Writes the tables to docs/results.md, the
figure to docs/regime_map.png and the two sentences of the README's "Where it pays" block,
so none of them is pasted by hand.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from pathlib import Path

from results import Section  # benchmarks/results.py: docs/results.md

from entrain.cost import cost_batch
from entrain.cost.hardware import HARDWARE
from entrain.models import load_spec
from entrain.models.spec import ModelSpec, TransformerSpec
from entrain.plan.planner import PlannerConfig
from entrain.planning import compare_policies, policy_planners
from entrain.schedule import POLICIES
from entrain.workload.traces import TRACE_MODELS, generate_workload

ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "docs" / "regime_map.png"
README = ROOT / "README.md"
HW = HARDWARE["h100"]
PER_GPU, BATCHES = 16, 2
WORTH_IT, TIE = 1.10, 1.02  # the README's thresholds: a clear gain, and a tie

VITS = {  # name: (hidden, layers, heads, intermediate, gated MLP)
    "ViT-0.3B": (1024, 24, 16, 4096, False),  # CLIP ViT-L/14
    "ViT-0.6B": (1280, 32, 16, 3420, True),  # Qwen2-VL's
    "ViT-2B": (1920, 40, 16, 7680, False),
    "ViT-6B": (3200, 45, 25, 12800, False),  # InternViT-6B's shape
}
MICROBATCH_SAMPLES = (1, 2, 4, 8, 16, 32)


def with_vit(spec: ModelSpec, vit: str, frozen: bool) -> ModelSpec:
    """`spec` with its vision encoder's trunk replaced by `vit` (projector and the rest kept)."""
    hidden, layers, heads, inter, gated = VITS[vit]
    trunk = TransformerSpec(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        num_key_value_heads=heads,
        gated_mlp=gated,
        causal=False,
        vocab_size=0,
    )
    encoders = tuple(
        dataclasses.replace(e, encoder=trunk, frozen=frozen) if e.name == "vision" else e
        for e in spec.encoders
    )
    return dataclasses.replace(spec, name=f"{spec.name}+{vit}", encoders=encoders)


def point(
    kind: str, spec: ModelSpec, gpus: int, mbs: float, tp: tuple[int, ...] = (1,)
) -> dict | None:
    """Every policy at its own best plan on one regime; None when no plan fits memory."""
    gb = PER_GPU * gpus
    work = generate_workload(kind, gb * BATCHES, seed=0)
    batches = [cost_batch(work.slice(i * gb, (i + 1) * gb), spec) for i in range(BATCHES)]
    for options in (tp, (1, 2, 4)) if tp == (1,) else (tp,):
        # where no plan fits 80 GB without tensor parallelism, allow it (simulated only)
        cfg = PlannerConfig(gpus=gpus, global_batch=gb, microbatch_samples=mbs, tp_options=options)
        results = {}
        for policy, planner in policy_planners(spec, batches, HW, cfg, tuple(POLICIES)).items():
            try:
                results[policy] = planner.plan()
            except ValueError:  # this policy has no plan that fits: it is out of this regime
                continue
        if "entrain" in results and len(results) >= 2:
            return {**compare_policies(results), "tp": max(options)}
    return None


def gain_cell(c: dict | None) -> str:
    if c is None:
        return "no fit"
    tp = "" if c["tp"] == 1 else f", TP<={c['tp']}"
    return f"{c['entrain_over_best_baseline']:.3f} ({c['best_baseline']}{tp})"


def main() -> int:
    t0 = time.time()
    out = Section("Regime map: where Entrain pays", INTRO, markdown=True)
    grid: dict[tuple[str, bool, float], dict | None] = {}
    omni = load_spec(TRACE_MODELS["omni"])
    for frozen in (False, True):
        out.print(f"\n{'frozen' if frozen else 'trained'} vision encoder, omni trace, 32 GPUs:"
                  " Entrain's throughput over the best baseline (which one)\n")  # fmt: skip
        heads = " | ".join(f"{m:g}/mb" for m in MICROBATCH_SAMPLES)
        out.print(f"| vision encoder | {heads} |")
        out.print("|---" * (len(MICROBATCH_SAMPLES) + 1) + "|")
        for vit in VITS:
            spec = with_vit(omni, vit, frozen)
            cells = []
            tp = (1, 2, 4) if vit == "ViT-6B" else (1,)  # 6B and its AdamW state: TP (simulated)
            for mbs in MICROBATCH_SAMPLES:
                grid[vit, frozen, mbs] = c = point("omni", spec, 32, float(mbs), tp)
                cells.append(gain_cell(c))
            out.print(f"| {vit} | " + " | ".join(cells) + " |")
            print(f"    ({time.time() - t0:.0f} s)", file=sys.stderr)
    mixes: dict[tuple[str, float], dict | None] = {}
    out.print("\nmodality mix, each trace with its model, 32 GPUs\n")
    out.print("| trace | model | 2/mb | 16/mb |\n|---|---|---|---|")
    for kind, model in TRACE_MODELS.items():
        if kind == "llava-pretrain":
            continue  # one small image each: the same regime as llava-instruct, less varied
        spec = load_spec(model)
        for mbs in (2.0, 16.0):
            mixes[kind, mbs] = point(kind, spec, 32, mbs)
        out.print(f"| {kind} | {model} | {gain_cell(mixes[kind, 2.0])} | "
                  f"{gain_cell(mixes[kind, 16.0])} |")  # fmt: skip
    print(f"    ({time.time() - t0:.0f} s)", file=sys.stderr)
    sizes: dict[tuple[int, float], dict | None] = {}
    out.print("\ncluster size, omni trace\n")
    out.print("| GPUs | 2/mb | 16/mb |\n|---|---|---|")
    for gpus in (32, 128, 512):
        for mbs in (2.0, 16.0):
            sizes[gpus, mbs] = point("omni", omni, gpus, mbs)
        out.print(f"| {gpus} | {gain_cell(sizes[gpus, 2.0])} | {gain_cell(sizes[gpus, 16.0])} |")
        print(f"    ({time.time() - t0:.0f} s)", file=sys.stderr)
    every = [c for c in (*grid.values(), *mixes.values(), *sizes.values()) if c is not None]
    gains = [c["entrain_over_best_baseline"] for c in every]
    out.print(
        f"\n{len(gains)} regimes: Entrain's gain over the best baseline ranges from "
        f"{min(gains):.3f}x to {max(gains):.3f}x (median {sorted(gains)[len(gains) // 2]:.3f}x); "
        f"{sum(g >= WORTH_IT for g in gains)} at {WORTH_IT:.2f}x or more, "
        f"{sum(g < 0.995 for g in gains)} more than 0.5% behind. "
        f"({time.time() - t0:.0f} s)"
    )
    out.save()
    draw(grid)
    write_readme(grid, mixes)
    return 0


INTRO = (
    "`benchmarks/regime_map.py`: each policy planned at its own best static plan "
    "(`entrain plan --compare`) on the same batches (16 samples per GPU, 2 batches, H100 "
    "model, FLOPs costs, fair encoder copies), and Entrain's throughput over the fastest "
    "baseline. 'TP<=4': no plan fits 80 GB without tensor parallelism, so plans with TP up to "
    "4 were searched (simulated only: the runtime has none yet), as for every 6B ViT cell; "
    "'no fit': not even then."
)


def draw(grid: dict) -> None:
    """The grid as two heat maps (trained, frozen vision encoder), written to docs/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for ax, frozen in zip(axes, (False, True)):
        table = np.full((len(VITS), len(MICROBATCH_SAMPLES)), np.nan)
        for i, vit in enumerate(VITS):
            for j, mbs in enumerate(MICROBATCH_SAMPLES):
                c = grid.get((vit, frozen, mbs))
                if c is not None:
                    table[i, j] = c["entrain_over_best_baseline"]
        norm = matplotlib.colors.TwoSlopeNorm(vmin=0.9, vcenter=1.0, vmax=1.2)
        im = ax.imshow(table, cmap="RdYlGn", norm=norm, aspect="auto")
        for i in range(table.shape[0]):
            for j in range(table.shape[1]):
                text = "no fit" if np.isnan(table[i, j]) else f"{table[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(MICROBATCH_SAMPLES)), [str(m) for m in MICROBATCH_SAMPLES])
        ax.set_yticks(range(len(VITS)), list(VITS))
        ax.set_xlabel("samples per microbatch")
        ax.set_title(f"{'frozen' if frozen else 'trained'} vision encoder")
    fig.colorbar(im, ax=axes, label="Entrain / best baseline (each at its own plan)")
    fig.suptitle("omni trace (7B LLM + audio encoder), 32 simulated H100s")
    fig.savefig(FIGURE, dpi=110, bbox_inches="tight")
    print(f"wrote {FIGURE}")


def write_readme(grid: dict, mixes: dict) -> None:
    """The README's sentences on where Entrain pays, from the map, between its markers."""
    text = README.read_text(encoding="utf-8")
    start, end = "<!-- regime-map:start -->", "<!-- regime-map:end -->"
    if start not in text or end not in text:
        print(f"{README}: no {start} block; sentences not written", file=sys.stderr)
        return
    gain = {k: c["entrain_over_best_baseline"] for k, c in grid.items() if c}
    worth = [k for k, g in gain.items() if g >= WORTH_IT]
    if worth:
        vits = [v for v in VITS if any(k[0] == v for k in worth)]
        sizes = sorted({k[2] for k in worth})
        kinds = sorted({"frozen" if k[1] else "trained" for k in worth})
        pays = (
            f"Entrain pays (>= {WORTH_IT:.2f}x the best baseline, up to {max(gain.values()):.2f}x)"
            f" with {sizes[0]}-{sizes[-1]} samples per microbatch and a {' or '.join(kinds)} "
            f"vision encoder of {vits[0].removeprefix('ViT-')} or more on omni-like data "
            f"({len(worth)} of {len(gain)} points of the map)."
        )
    else:
        pays = f"Entrain reaches {WORTH_IT:.2f}x the best baseline nowhere on the map."
    # from which microbatch size up every point is a tie, trained and frozen alike
    even = [m for m in MICROBATCH_SAMPLES
            if all(g < TIE for k, g in gain.items() if k[2] >= m)]  # fmt: skip
    frozen_best = max((g for k, g in gain.items() if k[1]), default=0.0)
    worst_key = min(gain, key=gain.get)
    ties = (
        f" From {even[0]} samples per microbatch up"
        + (
            f", and with a frozen vision encoder (at most {frozen_best:.2f}x)"
            if frozen_best < WORTH_IT
            else ""
        )  # fmt: skip
        + ", a user may as well balance LLM tokens (`--policy llm-balanced` or"
        f" encoder-rebalance); Entrain's worst point is {gain[worst_key]:.3f}x the best "
        f"baseline ({worst_key[0]}, "
        f"{'frozen' if worst_key[1] else 'trained'}, {worst_key[2]} per microbatch)."
        if even
        else ""
    )
    body = f"{start}\n{pays}{ties}\n![regime map](docs/regime_map.png)\n{end}"
    README.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), body, text, flags=re.S))
    print(f"wrote the regime-map block of {README}")


if __name__ == "__main__":
    sys.exit(main())

"""`entrain analyze`: how uneven a data set's microbatches are under each policy, and what
Entrain would gain, in seconds and without torch."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from entrain.cli_common import add_policies, progress_bar, stdout_console
from entrain.models.presets import PRESETS


def add_analyze_parser(sub) -> argparse.ArgumentParser:
    """`entrain analyze MANIFEST --model M --dp D --microbatches M --global-batch B`."""
    an = sub.add_parser(
        "analyze",
        help="how uneven are the microbatches, and what would Entrain gain",
        description="Split a manifest into global batches, run every policy on each and print the "
        "per-microbatch workload variability of every module (docs/analysis.md).",
    )
    an.add_argument("manifest", help="JSON Lines manifest (one sample per line)")
    an.add_argument(
        "--model",
        required=True,
        help=f"model preset ({', '.join(PRESETS)}), a YAML/JSON spec file, or a Hugging Face "
        "model folder (its config.json)",
    )
    an.add_argument("--dp", type=int, required=True, help="data-parallel replicas D")
    an.add_argument("--microbatches", type=int, required=True, help="microbatches per replica M")
    an.add_argument(
        "--global-batch",
        type=int,
        required=True,
        help="samples per iteration (the manifest must hold at least one global batch)",
    )
    an.add_argument(
        "--iterations",
        type=int,
        default=16,
        help="global batches to analyze from the start (default 16; 0 = all)",
    )
    add_policies(an, "compare")
    an.add_argument(
        "--seed",
        type=int,
        default=None,
        help="shuffle the samples with this seed before batching, as a training epoch "
        "would (default: manifest order; reads the whole manifest)",
    )
    an.add_argument(
        "--profile",
        default=None,
        help="measured profile (entrain profile): work in measured seconds, not FLOPs",
    )
    an.add_argument(
        "--allow-empty-microbatches",
        action="store_true",
        help="analyze even when a replica gets fewer samples than microbatches (the empty "
        "ones count in every cv)",
    )
    an.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    an.set_defaults(func=cmd_analyze)
    return an


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}x"


def render_analysis(result: dict, console: Console) -> None:
    """The policy table a person reads."""
    cfg = result["config"]
    modules = result["modules"]
    table = Table(
        title=(
            f"{result['model']}: D={cfg['dp']} replicas x M={cfg['microbatches']} microbatches, "
            f"global batch {cfg['global_batch']}, {result['iterations']} iteration(s)"
        ),
        caption=(
            "cv: std/mean of per-microbatch work (lower is better); gap: worst microbatch over "
            "the lower bound; stretch: pipeline slowdown proxy (1.0 is perfect); "
            "vs entrain: a policy's worst cv over entrain's"
        ),
    )
    table.add_column("policy", style="bold")
    table.add_column("worst cv", justify="right")
    for m in modules:
        table.add_column(f"cv {m}", justify="right")
    table.add_column("worst gap", justify="right")
    table.add_column("stretch", justify="right")
    table.add_column("peak deferred tok", justify="right")
    table.add_column("vs entrain", justify="right")
    table.add_column("ms/batch", justify="right")
    red = result["cv_reduction"]
    for name, m in result["policies"].items():
        table.add_row(
            name,
            f"{m['worst_cv']:.4f}",
            *(f"{m['cv'][mod]:.4f}" for mod in modules),
            f"{100 * max(m['bound_gap'].values()):.1f}%",
            f"{m['stretch']:.4f}",
            f"{m['peak_deferred']:,.0f}",
            "1.0x" if name == "entrain" else _fmt_ratio(red.get(name)),
            f"{m['ms_per_batch']:.1f}",
            style="green" if name == "entrain" else None,
        )
    console.print(table)
    if result["skipped_tail_samples"]:
        console.print(
            f"[yellow]note:[/] the last {result['skipped_tail_samples']} samples do not fill "
            "a global batch and were not analyzed"
        )


def cmd_analyze(args: argparse.Namespace, err: Console) -> int:
    from entrain.analyze import AnalyzeConfig, analyze
    from entrain.models.load import load_spec

    spec = load_spec(args.model)
    cfg = AnalyzeConfig(
        dp=args.dp,
        microbatches=args.microbatches,
        global_batch=args.global_batch,
        iterations=args.iterations,
        policies=tuple(args.policies),
        seed=args.seed,
        allow_empty_microbatches=args.allow_empty_microbatches,
    )
    if cfg.empty_microbatches:
        err.print(
            f"note: {cfg.empty_microbatches} of {cfg.microbatches} microbatches per replica "
            "are empty in every batch; every cv counts them"
        )
    model = None
    if args.profile:  # balance and measure in measured seconds instead of FLOPs
        from entrain.cost.profile import load_profile

        profile = load_profile(args.profile, spec)
        model = profile.cost_model()
    total = cfg.iterations * cfg.global_batch if cfg.iterations else None
    with progress_bar("reading samples", total, err) as advance:
        result = analyze(args.manifest, spec, cfg, cost_model=model, on_progress=advance)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        render_analysis(result, stdout_console())
    return 0

"""The `entrain` command line.

User mistakes (a bad manifest line, an unknown preset, a modality the model cannot encode)
end in one line on stderr and exit status 2, never a traceback; anything else is a bug and
keeps its traceback. ENTRAIN_DEBUG=1 shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from entrain.models.presets import PRESETS
from entrain.schedule import POLICIES
from entrain.workload.traces import GENERATORS

EXIT_USAGE = 2


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


@contextlib.contextmanager
def progress_bar(
    description: str, total: int | None, console: Console
) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr (only on a terminal, so piped output stays clean)."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def stdout_console() -> Console:
    """A console for tables: the terminal's width, or wide enough not to cut columns when
    the output goes to a file or a pipe."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=160)


# ---------------------------------------------------------------------------------- trace


def cmd_trace_generate(args: argparse.Namespace, err: Console) -> int:
    from entrain.workload.traces import write_trace

    if args.n <= 0:
        raise UserError(f"--n must be positive, got {args.n}")
    with progress_bar(f"writing {args.kind}", args.n, err) as advance:
        n = write_trace(args.kind, args.n, args.seed, args.output, on_progress=advance)
    err.print(f"wrote {n} samples of kind {args.kind!r} (seed {args.seed}) to {args.output}")
    return 0


# -------------------------------------------------------------------------------- analyze


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
    if result["partial_batch"]:
        console.print(
            "[yellow]note:[/] the manifest is smaller than one global batch; analyzed what it has"
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
    )
    total = cfg.iterations * cfg.global_batch if cfg.iterations else None
    with progress_bar("reading samples", total, err) as advance:
        result = analyze(args.manifest, spec, cfg, on_progress=advance)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        render_analysis(result, stdout_console())
    return 0


# --------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="entrain",
        description=(
            "Entrain balances microbatches for multimodal LLM training when images, audio, video "
            "and text vary from sample to sample."
        ),
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    trace = sub.add_parser("trace", help="synthetic traces shaped like public data sets")
    tsub = trace.add_subparsers(dest="trace_command", required=True, metavar="ACTION")
    gen = tsub.add_parser(
        "generate",
        help="write a synthetic manifest",
        description="Write a JSON Lines manifest whose samples follow the statistics of a public "
        "data set (see the README for the sources).",
    )
    gen.add_argument(
        "--kind", required=True, choices=sorted(GENERATORS), help="which data set to imitate"
    )
    gen.add_argument("--n", type=int, required=True, help="number of samples")
    gen.add_argument(
        "--seed", type=int, default=0, help="random seed (same seed, same trace; default 0)"
    )
    gen.add_argument("-o", "--output", required=True, help="manifest file to write (.jsonl)")
    gen.set_defaults(func=cmd_trace_generate)

    an = sub.add_parser(
        "analyze",
        help="how uneven are the microbatches, and what would Entrain gain",
        description="Split a manifest into global batches, run every policy on each and print the "
        "per-microbatch workload variability of every module (DESIGN.md section 6).",
    )
    an.add_argument("manifest", help="JSON Lines manifest (one sample per line)")
    an.add_argument(
        "--model",
        required=True,
        help=f"model preset ({', '.join(PRESETS)}) or a YAML/JSON spec file",
    )
    an.add_argument("--dp", type=int, required=True, help="data-parallel replicas D")
    an.add_argument("--microbatches", type=int, required=True, help="microbatches per replica M")
    an.add_argument("--global-batch", type=int, required=True, help="samples per iteration")
    an.add_argument(
        "--iterations",
        type=int,
        default=16,
        help="global batches to analyze from the start (default 16; 0 = all)",
    )
    an.add_argument(
        "--policies",
        nargs="+",
        default=list(POLICIES),
        choices=list(POLICIES),
        metavar="POLICY",
        help=f"policies to compare (default: all of {', '.join(POLICIES)})",
    )
    an.add_argument(
        "--seed",
        type=int,
        default=None,
        help="shuffle the samples with this seed before batching, as a training epoch "
        "would (default: manifest order; reads the whole manifest)",
    )
    an.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    an.set_defaults(func=cmd_analyze)
    return p


def main(argv: list[str] | None = None) -> int:
    from entrain.cost.batch import MissingEncoderError
    from entrain.models.load import SpecError
    from entrain.workload.manifest import ManifestError

    args = build_parser().parse_args(argv)
    err = Console(stderr=True)
    try:
        return args.func(args, err)
    except (UserError, ManifestError, SpecError, MissingEncoderError, ValueError, OSError) as e:
        if os.environ.get("ENTRAIN_DEBUG"):
            raise
        err.print("[red]entrain: error:[/]", escape(str(e)), highlight=False, soft_wrap=True)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

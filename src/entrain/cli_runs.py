"""`entrain runs` and `entrain report`: what a user looks at after training (or analyzing)."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from entrain.cli_common import UserError, progress_bar, stdout_console


def add_runs_parser(sub) -> argparse.ArgumentParser:
    """`entrain runs DIR...`: runs side by side, with the simulator's replay on request."""
    ru = sub.add_parser(
        "runs",
        help="compare training runs (throughput, loss)",
        description="Summarize the metrics.jsonl of training runs side by side; with --simulate "
        "or --profile, also set each run's measured iteration time against the simulator's "
        "replay of the same steps (same batches, same assignment).",
    )
    ru.add_argument("runs", nargs="+", help="run directories (entrain train --out DIR)")
    ru.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="steps left out of the medians (default 2); a run with no more steps than that "
        "is summarized over all its steps, marked * and noted",
    )
    ru.add_argument(
        "--simulate",
        action="store_true",
        help="also replay every step in the simulator with the profile each run trained with",
    )
    ru.add_argument(
        "--profile",
        default=None,
        help="replay with this profile instead (implies --simulate)",
    )
    ru.add_argument("--json", action="store_true", help="print JSON")
    ru.set_defaults(func=cmd_runs)
    return ru


def cmd_runs(args: argparse.Namespace, err: Console) -> int:
    from entrain.report.runs import summarize

    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    notes: list[str] = []
    rows = [summarize(d, args.warmup, notes) for d in args.runs]
    short = [r for r in rows if r["warmup"] < args.warmup]
    for r in short:
        notes.append(
            f"{r['run']} has only {r['steps']} step(s), not more than --warmup "
            f"{args.warmup}: its medians are over all of them"
        )
    for note in notes:
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    if args.profile or args.simulate:
        from entrain.sim.replay import replay_run

        for r in rows:
            rep = replay_run(r["run"], args.profile, args.warmup)
            r.update(measured_iter_time=rep.measured, simulated_iter_time=rep.simulated)
            r["simulation_error"] = rep.error
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    sim = "simulated_iter_time" in rows[0]
    title = f"training runs (medians after {args.warmup} warm-up steps"
    title += "; * over all steps: the run has no more)" if short else ")"
    table = Table(title=title)
    cols = ["run", "steps", "samples/s", "tokens/s", "loss first -> last", "vs first run"]
    if sim:
        cols += ["iter time (s)", "simulated (s)", "error"]
    for col in cols:
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in rows:
        cells = [
            r["run"],
            f"{r['steps']}{'*' if r['warmup'] < args.warmup else ''}",
            f"{r['samples_per_s']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}",
            f"{r['samples_per_s'] / rows[0]['samples_per_s']:.3f}x",
        ]
        if sim:
            cells += [
                f"{r['measured_iter_time']:.4f}",
                f"{r['simulated_iter_time']:.4f}",
                f"{100 * r['simulation_error']:+.1f}%",
            ]
        table.add_row(*cells)
    stdout_console().print(table)
    return 0


def add_report_parser(sub) -> argparse.ArgumentParser:
    """`entrain report SOURCE`: one self-contained HTML page."""
    rp = sub.add_parser(
        "report",
        help="an HTML report of an analysis or a training run",
        description="Write one self-contained HTML page (figures inlined, no network): from "
        "`entrain analyze --json` output, the work of each microbatch per module under every "
        "policy and the spread per policy; from a run directory (`entrain train --out`), loss "
        "and step time over steps, the pipeline timeline of the traced step, and with a "
        "profile the simulator's replay beside the measurement.",
    )
    rp.add_argument("source", help="run directory, or a JSON file from `entrain analyze --json`")
    rp.add_argument("-o", "--output", default="report.html", help="page to write (report.html)")
    rp.set_defaults(func=cmd_report)
    return rp


def cmd_report(args: argparse.Namespace, err: Console) -> int:
    from entrain.report.html import write_report

    notes: list[str] = []
    with progress_bar("drawing", None, err):
        n = write_report(args.source, args.output, notes)
    for note in notes:
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    err.print(f"wrote {args.output} ({n} figure(s)); open it in a browser")
    return 0

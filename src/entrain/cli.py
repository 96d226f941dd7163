"""The `entrain` command line.

User mistakes (a bad manifest line, an unknown preset, a modality the model cannot encode)
end in one line on stderr and exit status 2, never a traceback; anything else is a bug and
keeps its traceback. ENTRAIN_DEBUG=1 shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from entrain.cli_common import UserError, progress_bar, stdout_console
from entrain.cli_data import add_manifest_parser
from entrain.cli_export import cmd_export
from entrain.cli_plan import cmd_plan, cmd_simulate
from entrain.cli_train import add_train_parser, cmd_demo_data, cmd_profile, cmd_report, cmd_runs
from entrain.models.presets import PRESETS
from entrain.schedule import POLICIES
from entrain.workload.traces import GENERATORS

EXIT_USAGE = 2

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


# --------------------------------------------------------------------------------- parser


def _add_policies(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--policies",
        nargs="+",
        default=list(POLICIES),
        choices=list(POLICIES),
        metavar="POLICY",
        help=f"policies to {verb} (default: all of {', '.join(POLICIES)})",
    )


def _device_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """--device, as train and profile take it (runtime/device.py resolves it)."""
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help=f"{what}; default auto: the GPUs when CUDA has any, else the CPU",
    )


def _optional_float(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def _cache_mb(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected megabytes or 'none', got {text!r}") from None


def _lookahead(text: str) -> int | None | str:
    if text in ("auto", "unlimited"):
        return None if text == "unlimited" else text
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected auto, unlimited or N >= 0, got {text!r}"
        ) from None
    if n < -1:
        raise argparse.ArgumentTypeError(f"expected auto, unlimited or N >= 0, got {n}")
    return None if n == -1 else n  # -1: unlimited, as before


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

    add_manifest_parser(sub)

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
        help=f"model preset ({', '.join(PRESETS)}), a YAML/JSON spec file, or a Hugging Face "
        "model folder (its config.json)",
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
    _add_policies(an, "compare")
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
    an.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    an.set_defaults(func=cmd_analyze)

    for name, helptext in (
        ("plan", "choose one static parallel plan for a cluster"),
        ("simulate", "simulate every policy on a plan"),
    ):
        sp = sub.add_parser(name, help=helptext, description=_PLAN_HELP[name])
        sp.add_argument("manifest", help="JSON Lines manifest")
        sp.add_argument(
            "--model", required=True, help="model preset, spec file or Hugging Face model folder"
        )
        sp.add_argument("--gpus", type=int, required=True, help="GPUs G the plan uses")
        sp.add_argument(
            "--hardware", default="h100", help="hardware profile: h100, h200, a100 (default h100)"
        )
        sp.add_argument(
            "--profile",
            default=None,
            help="measured profile (entrain profile): its seconds and machine replace the "
            "FLOPs model and --hardware",
        )
        sp.add_argument(
            "--global-batch",
            type=int,
            default=None,
            help="samples per iteration (default 16 per GPU)",
        )
        sp.add_argument(
            "--microbatch-size",
            type=float,
            default=16.0,
            help="samples per microbatch: ~16 is the wide regime, 1-2 narrow (default 16)",
        )
        sp.add_argument(
            "--iterations", type=int, default=4, help="global batches to sample (default 4)"
        )
        sp.add_argument(
            "--precision",
            default="bf16",
            choices=("bf16", "fp32"),
            help="the run's precision, for its memory (default bf16, as on GPUs)",
        )
        sp.add_argument(
            "--recompute",
            default="full",
            choices=("full", "none"),
            help="whether the run recomputes activations, for its memory (default full)",
        )
        sp.add_argument(
            "--tp",
            default="1",
            metavar="DEGREES",
            help="tensor-parallel degrees to consider, e.g. 1,2,4,8 (default 1: the layouts "
            "`entrain train` runs; larger degrees are simulated only)",
        )
        sp.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "plan":
            sp.add_argument(
                "--policy",
                default="entrain",
                choices=list(POLICIES),
                help="policy the plans are simulated with (default entrain)",
            )
            sp.add_argument(
                "-o", "--output", help="write the plan (JSON) here, for simulate --plan"
            )
            sp.add_argument("--plot", help="save the static-vs-oracle figure (PNG) here")
            sp.set_defaults(func=cmd_plan)
        else:
            sp.add_argument("--plan", help="plan JSON from `entrain plan -o` (default: plan now)")
            _add_policies(sp, "simulate")
            sp.add_argument(
                "--trace", help="write a Chrome/Perfetto trace of entrain's first batch here"
            )
            sp.set_defaults(func=cmd_simulate)
    add_train_parser(sub)

    pr = sub.add_parser(
        "profile",
        help="time the real modules here and fit the cost model (for --profile)",
        description="Run the model's real modules on whole microbatches of varied sizes (drawn "
        "from --data, or from a synthetic trace), time forward and backward apart, and "
        "fit each module's cost a*x + b*x^2 + c0 per unit plus a constant per run by least "
        "squares. With --nproc 2 or more, every process profiles at once (the machine is "
        "as busy as in training) and two of them time real sends for the link. The "
        "profile replaces the FLOPs model in simulate, plan and train (--profile).",
    )
    pr.add_argument(
        "--model",
        default="tiny",
        help="model preset, spec file or Hugging Face model folder (its architecture, random "
        "weights: values do not change the time of dense math; default tiny)",
    )
    pr.add_argument("-o", "--output", default="profile.json", help="where to write the profile")
    src = pr.add_mutually_exclusive_group()
    src.add_argument("--data", help="manifest whose sample sizes to profile on (recommended)")
    src.add_argument(
        "--trace",
        choices=list(GENERATORS),
        help="synthetic trace to draw sizes from (default: omni with audio, else interleaved)",
    )
    pr.add_argument("--samples", type=int, default=256, help="trace samples (default 256)")
    pr.add_argument(
        "--runs", type=int, default=40, help="timed microbatches per module and process (40)"
    )
    pr.add_argument(
        "--max-samples", type=int, default=8, help="most samples in a microbatch (default 8)"
    )
    pr.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    pr.add_argument("--nproc", type=int, default=2, help="processes (default 2; 1 skips the link)")
    pr.add_argument("--pin-cores", action="store_true", help="pin each process to its own core")
    _device_flag(pr, "where to time the modules (profile where you train)")
    pr.add_argument("--json", action="store_true", help="print the profile as JSON")
    pr.set_defaults(func=cmd_profile, argv=None)

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

    dd = sub.add_parser(
        "demo-data",
        help="make a small real image/audio/caption data set",
        description="Write PNG images of varied sizes and counts per sample, WAV "
        "clips and captions, and a training manifest describing them.",
    )
    dd.add_argument("-o", "--output", required=True, help="directory to write")
    dd.add_argument("--n", type=int, default=96, help="samples (default 96)")
    dd.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    dd.add_argument(
        "--chat",
        action="store_true",
        help="conversations (a user turn with the items and a question, the caption as the "
        "assistant's answer: the loss on the answer only) instead of plain captions",
    )
    dd.add_argument(
        "--video",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of samples with a short video (MPEG-4 files and folders of PNG frames; "
        "default 0)",
    )
    dd.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="a Hugging Face model folder: count text tokens with its tokenizer and "
        "placeholders, so the data trains with `entrain train --model DIR` (default: the "
        "byte tokenizer of the presets)",
    )
    dd.set_defaults(func=cmd_demo_data)

    ex = sub.add_parser(
        "export",
        help="write a trained run's checkpoint as a Hugging Face model folder",
        description="Gather every rank's part of a checkpoint of a run started from a Hugging "
        "Face model folder and write a folder that transformers loads "
        "(from_pretrained): the source folder's config, tokenizer and processor files, and "
        "the trained weights as safetensors shards under the source's tensor names.",
    )
    ex.add_argument("run", help="run directory (entrain train --out), or a checkpoint folder")
    ex.add_argument(
        "--checkpoint",
        type=int,
        default=None,
        metavar="STEP",
        help="the checkpoint after this many steps (default: the latest complete one)",
    )
    ex.add_argument("-o", "--output", required=True, help="folder to write")
    ex.add_argument(
        "--dtype",
        default="source",
        choices=("source", "float32", "bfloat16", "float16"),
        help="dtype of the written weights (default: the source checkpoint's)",
    )
    ex.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="largest safetensors file, as transformers writes them (default 5GB)",
    )
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    ex.add_argument("--json", action="store_true", help="print what was written as JSON")
    ex.set_defaults(func=cmd_export)

    ru = sub.add_parser(
        "runs",
        help="compare training runs (throughput, loss)",
        description="Summarize the metrics.jsonl of training runs side by side; with --simulate "
        "or --profile, also set each run's measured iteration time against the simulator's "
        "replay of the same steps (same batches, same assignment).",
    )
    ru.add_argument("runs", nargs="+", help="run directories (entrain train --out DIR)")
    ru.add_argument(
        "--warmup", type=int, default=2, help="steps left out of the medians (default 2)"
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
    return p


_PLAN_HELP = {
    "plan": "Enumerate the plans (GPUs per encoder, LLM pipeline and tensor degrees, data "
    "parallelism, Entrain's deferral depth) that fit the GPUs and their memory, simulate "
    "the most promising on sampled global batches and keep the fastest. Also reports the "
    "dynamic oracle, which re-plans for every batch, and static_over_oracle.",
    "simulate": "Simulate one training iteration per sampled global batch for every policy, on a "
    "plan from --plan or chosen now, and report iteration time, throughput, bubbles "
    "and speed-ups.",
}


def main(argv: list[str] | None = None) -> int:
    from entrain.cost.batch import MissingEncoderError
    from entrain.models.load import SpecError
    from entrain.workload.manifest import ManifestError

    args = build_parser().parse_args(argv)
    err = Console(stderr=True)
    try:
        return args.func(args, err)
    except BrokenPipeError:  # `entrain ... | head`: the reader left, nothing to report
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 (silence the flush at exit)
        return 0
    except (UserError, ManifestError, SpecError, MissingEncoderError, ValueError, OSError) as e:
        if os.environ.get("ENTRAIN_DEBUG"):
            raise
        if os.environ.get("RANK", "0") == "0" or not _same_on_every_rank(e):
            err.print("[red]entrain: error:[/]", escape(str(e)), highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except RuntimeError as e:  # a rank lost its peers or waited too long: name it, no traceback
        from entrain.runtime.comm import CommError

        if not isinstance(e, CommError) or os.environ.get("ENTRAIN_DEBUG"):
            raise
        err.print("[red]entrain: error:[/]", escape(str(e)), highlight=False, soft_wrap=True)
        return 1


def _same_on_every_rank(e: Exception) -> bool:
    """Errors every rank of a run raises alike (bad input found before training): under
    torchrun only rank 0 prints them."""
    from entrain.data.codec import CodecError
    from entrain.models.hf import HFConfigError
    from entrain.models.load import SpecError
    from entrain.runtime.hf_load import WeightsError
    from entrain.runtime.inputs import SampleError
    from entrain.workload.manifest import ManifestError

    return isinstance(
        e,
        SampleError
        | UserError
        | ManifestError
        | SpecError
        | HFConfigError
        | WeightsError
        | CodecError,
    )


if __name__ == "__main__":
    sys.exit(main())

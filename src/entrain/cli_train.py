"""The commands that run the model: `entrain train` (launching torchrun when asked) and
`entrain profile`."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from rich.console import Console
from rich.table import Table

from entrain.cli_common import UserError, device_flag, stdout_console
from entrain.workload.traces import GENERATORS


def add_train_parser(sub) -> argparse.ArgumentParser:
    """`entrain train [RECIPE] [section.key=value ...] [flags]`: flags, help and defaults come
    from the config's components (entrain/config.py)."""
    from entrain.config import add_flags

    tr = sub.add_parser(
        "train",
        help="train for real with torchrun (CPU with gloo, GPUs with NCCL)",
        description="Train a model on a training manifest with real Hugging Face modules: each "
        "encoder on its own ranks, the LLM as pipeline stages, times data-parallel replicas. "
        "Settings come from a recipe (YAML, one mapping per section), then section.key=value "
        "overrides, then flags. Run it under torchrun, or pass --nproc P to launch torchrun "
        "on this machine.",
    )
    tr.add_argument(
        "recipe",
        nargs="*",
        metavar="RECIPE.yaml | section.key=value",
        help="a recipe file (examples/recipes/), and overrides of its keys",
    )
    add_flags(tr)
    launch = tr.add_argument_group("launching")
    launch.add_argument(
        "--nproc", type=int, default=None, help="launch torchrun with this many processes"
    )
    launch.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="with --nproc: torchrun restarts the ranks this many times after a failure "
        "(use with --resume to continue from the last checkpoint)",
    )
    tr.set_defaults(func=cmd_train, argv=None)
    return tr


def train_config(args: argparse.Namespace):
    """The run's TrainConfig from a parsed `entrain train` command line."""
    from entrain.config import SECTIONS, config_from

    fields = {f for cls in SECTIONS.values() for f in cls.__dataclass_fields__}
    flags = {k: v for k, v in vars(args).items() if k in fields}
    positional = list(args.recipe or [])
    recipe = None
    if positional and "=" not in positional[0]:
        recipe = positional.pop(0)
    stray = [p for p in positional if "=" not in p]
    if stray:
        raise UserError(
            f"{stray[0]!r}: expected a recipe file first, then section.key=value overrides"
        )
    return config_from(flags, recipe, positional)


def cmd_train(args: argparse.Namespace, err: Console) -> int:
    cfg = train_config(args)
    if "RANK" in os.environ:
        from entrain.report.trace import write_chrome_trace
        from entrain.runtime.train import main_from_env

        return main_from_env(cfg, lambda ev, path, name: write_chrome_trace(ev, path, name=name))
    if not args.nproc:
        raise UserError(
            "run `entrain train` under torchrun, or pass --nproc P to have it launch torchrun"
        )
    _check_device(cfg.device, args.nproc)
    _check_layout(cfg, args.nproc)
    _check_model(cfg, err)
    _check_tensorboard(cfg)
    argv = sys.argv[1:] if args.argv is None else args.argv
    return _launch_torchrun(args.nproc, argv, args.max_restarts)


def _check_tensorboard(cfg) -> None:
    """--tensorboard needs an optional package: say so before any process starts."""
    import importlib.util

    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError(
            "--tensorboard needs the tensorboard package: pip install 'entrain[tensorboard]'"
        )
    if cfg.tensorboard and not cfg.out:
        raise UserError("--tensorboard writes next to metrics.jsonl: give --out DIR too")


def _check_layout(cfg, nproc: int) -> None:
    """The processes hold the layout (replicas, encoder copies, LLM stages): checked once here,
    not by every rank after start-up."""
    from entrain.runtime.setup import run_layout, spec_of

    spec = spec_of(cfg)
    plan = run_layout(cfg, [e.name for e in spec.encoders], nproc)
    if plan.llm_pp > spec.llm.num_hidden_layers:
        raise UserError(
            f"--pp {plan.llm_pp}: the LLM of {spec.name!r} has only "
            f"{spec.llm.num_hidden_layers} layer(s) to split into stages"
        )


def _check_model(cfg, err: Console) -> None:
    """A model folder's config, tokenizer and every tensor's presence and shape (headers
    only), before launching: one line for a bad folder, and no rank starts on half-loaded
    weights."""
    if not os.path.isdir(cfg.model):
        return
    from entrain.runtime.source import check_weights, model_source

    source = model_source(
        cfg.model, cfg.seed, cfg.init_from, cfg.audio_from, cfg.freeze, cfg.tokenizer
    )
    source.codec()
    n = check_weights(source)
    if n:
        err.print(f"entrain: {cfg.model}: {n} tensors present with the shapes its config gives")


def _check_device(device: str, nproc: int) -> None:
    """Refuse an impossible --device before launching: one message, not one per process."""
    from entrain.runtime.device import place

    try:
        place(device, 0, nproc)
    except ValueError as e:
        raise UserError(str(e)) from None


def _launch_torchrun(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """Re-run this command under torchrun with `nproc` processes on this machine."""
    import socket
    import subprocess

    rest, skip = [], False
    for a in argv:  # drop the launcher's own flags: the children are the processes
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--max-restarts"):
            skip = True
            continue
        if a.startswith(("--nproc=", "--max-restarts=")):
            continue
        rest.append(a)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        # a c10d rendezvous, not a static master address: each restart is a new round with
        # fresh keys (with a static one, a restarted rank could read the old round's peer
        # addresses and fail to connect)
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        f"entrain-{os.getpid()}-{port}",
        "--max-restarts",
        str(max_restarts),
        "-m",
        "entrain",
        *rest,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, bufsize=1)
    for line in _launcher_noise_removed(proc.stderr):
        sys.stderr.write(line)
    rc = proc.wait()
    if rc:
        sys.stderr.write(f"entrain: a process of this run failed (torchrun exit code {rc})\n")
    return rc


_LOG_LINE = re.compile(r"^[WI]\d{4} \d\d:\d\d:\d\d")


def _launcher_noise_removed(lines):
    """The ranks' stderr as it comes, less torchrun's own chatter: its warning lines, and
    the Python traceback it prints about itself when a rank fails (the ranks have said what
    went wrong; its summary of which rank failed how is kept)."""
    held: list[str] = []
    for line in lines:
        if held:
            held.append(line)
            if line[:1] not in (" ", "\t") and not line.startswith("Traceback"):
                if not line.startswith("torch.distributed.elastic.multiprocessing.errors."):
                    yield from held  # a rank's own traceback: keep it
                held = []
            continue
        if line.startswith("Traceback (most recent call last):"):
            held = [line]
        elif not _LOG_LINE.match(line) and not line.startswith("*****"):
            yield line
    yield from held


def cmd_profile(args: argparse.Namespace, err: Console) -> int:
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    if args.runs < 4:
        raise UserError(f"--runs must be >= 4 (the fit has 4 terms), got {args.runs}")
    if args.max_samples < 1:
        raise UserError(f"--max-samples must be >= 1, got {args.max_samples}")
    if "RANK" not in os.environ and args.nproc > 1:
        _check_device(args.device, args.nproc)
        return _launch_torchrun(args.nproc, sys.argv[1:] if args.argv is None else args.argv)
    from entrain.models.load import load_spec
    from entrain.runtime.profile import ProfileConfig, profile_main

    spec = load_spec(args.model)
    workload, source = _profile_sizes(args, spec)
    cfg = ProfileConfig(
        model=args.model,
        runs=args.runs,
        max_samples=args.max_samples,
        seed=args.seed,
        device=args.device,
    )
    profile = profile_main(cfg, spec, workload, pin_cores=args.pin_cores, console=err)
    if profile is None:  # not rank 0
        return 0
    profile.host["sizes_from"] = source
    profile.save(args.output)
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
        return 0
    _print_profile(profile, args.output, source)
    return 0


def _profile_sizes(args: argparse.Namespace, spec):
    """The sample sizes to profile on: the user's manifest, or a synthetic trace."""
    if args.data:
        from entrain.workload.manifest import read_manifest

        return read_manifest(args.data), f"manifest {args.data}"
    from entrain.workload.traces import generate_workload

    kind = args.trace or (
        "omni" if any(e.name == "audio" for e in spec.encoders) else "interleaved"
    )
    return generate_workload(kind, args.samples, seed=args.seed), f"synthetic trace {kind}"


def _print_profile(profile, path: str, source: str) -> None:
    con = stdout_console()
    table = Table(title=f"measured costs of {profile.model} (seconds; x = tokens of a unit)")
    for col in (
        "module",
        "pass",
        "a (per token)",
        "b (per token^2)",
        "c0 (per unit)",
        "per run",
        "fit error (rms / max)",
        "runs",
    ):
        table.add_column(col, justify="left" if col in ("module", "pass") else "right")
    for section, fits in (("", profile.modules), (" projector", profile.llm_projectors)):
        for m, kinds in fits.items():
            for kind, f in kinds.items():
                c = f.coeffs
                table.add_row(
                    m + section,
                    kind,
                    f"{c.a:.3g}",
                    f"{c.b:.3g}",
                    f"{c.c0:.3g}",
                    f"{c.call:.3g}",
                    f"{100 * f.rel_rms:.1f}% / {100 * f.max_rel:.1f}%",
                    str(f.runs),
                )
    con.print(table)
    steps = ", ".join(f"{m} {1e3 * s:.2f} ms" for m, s in profile.step.items())
    con.print(f"optimizer step: {steps}")
    con.print(
        f"compute: {profile.flops / 1e9:,.1f} GFLOP/s achieved per process "
        f"({profile.host.get('threads_per_process')} thread(s)); sizes from {source}"
    )
    if profile.p2p:
        p = profile.p2p
        con.print(
            f"p2p between 2 of {profile.devices} processes: receive {1e3 * p.latency:.3f} ms + "
            f"bytes / {p.bandwidth / 1e9:.2f} GB/s (fit error {100 * p.rel_rms:.1f}%), "
            f"send {1e3 * p.send:.3f} ms"
        )
    else:
        con.print("p2p: not measured (one process; use --nproc 2 or more)")
    con.print(f"profile written to {path}; use it with --profile in simulate, plan and train")


def add_profile_parser(sub) -> argparse.ArgumentParser:
    """`entrain profile`: time the real modules and fit the cost model."""
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
    device_flag(pr, "where to time the modules (profile where you train)")
    pr.add_argument("--json", action="store_true", help="print the profile as JSON")
    pr.set_defaults(func=cmd_profile, argv=None)
    return pr

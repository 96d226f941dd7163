"""`entrain train`, `entrain demo-data` and `entrain runs`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from rich.console import Console
from rich.table import Table

from entrain.cli_common import UserError, stdout_console


def cmd_demo_data(args: argparse.Namespace, err: Console) -> int:
    from entrain.runtime.demo_data import make_demo_data

    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    path = make_demo_data(args.output, args.n, seed=args.seed)
    err.print(f"wrote {args.n} samples (PNG images, WAV clips, captions) and {path}")
    return 0


TRAIN_FLAGS = (
    "model",
    "data",
    "policy",
    "steps",
    "global_batch",
    "microbatches",
    "dp",
    "pp",
    "lr",
    "seed",
    "lookahead",
    "pool",
    "timeout_s",
    "out",
)


def cmd_train(args: argparse.Namespace, err: Console) -> int:
    from entrain.runtime.setup import TrainConfig

    cfg = TrainConfig(
        **{k: getattr(args, k) for k in TRAIN_FLAGS},
        shuffle=not args.no_shuffle,
        trace=args.trace,
        save_params=args.save_params,
    )
    if "RANK" in os.environ:
        from entrain.runtime.train import main_from_env

        return main_from_env(cfg)
    if not args.nproc:
        raise UserError(
            "run `entrain train` under torchrun, or pass --nproc P to have it launch torchrun"
        )
    return _launch_torchrun(args.nproc, sys.argv[1:] if args.argv is None else args.argv)


def _launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with `nproc` processes on this machine."""
    import socket
    import subprocess

    rest, skip = [], False
    for a in argv:  # drop --nproc N: the children are the processes
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
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
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        "-m",
        "entrain",
        *rest,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.call(cmd, env=env)


def cmd_runs(args: argparse.Namespace, err: Console) -> int:
    from entrain.report.runs import summarize

    rows = [summarize(d) for d in args.runs]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="training runs (medians after 2 warm-up steps)")
    for col in ("run", "steps", "samples/s", "tokens/s", "loss first -> last", "vs first run"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in rows:
        table.add_row(
            r["run"],
            str(r["steps"]),
            f"{r['samples_per_s']:.1f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['first_loss']:.3f} -> {r['last_loss']:.3f}",
            f"{r['samples_per_s'] / rows[0]['samples_per_s']:.3f}x",
        )
    stdout_console().print(table)
    return 0

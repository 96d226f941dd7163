"""The `entrain` command line: each `cli_*.py` module defines its subcommands; this one
assembles them and turns user errors into one line.

User mistakes (a bad manifest line, an unknown preset, a modality the model cannot encode)
end in one line on stderr and exit status 2, never a traceback; anything else is a bug and
keeps its traceback. ENTRAIN_DEBUG=1 shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from rich.console import Console
from rich.markup import escape

from entrain.cli_analyze import add_analyze_parser
from entrain.cli_common import UserError
from entrain.cli_data import (
    add_demo_data_parser,
    add_manifest_parser,
    add_trace_parser,
)
from entrain.cli_export import add_export_parser
from entrain.cli_plan import add_plan_parser, add_simulate_parser
from entrain.cli_runs import add_report_parser, add_runs_parser
from entrain.cli_train import add_profile_parser, add_train_parser

EXIT_USAGE = 2

# In the order `entrain --help` lists them: the data, its analysis, planning, running,
# looking at runs, shipping the result.
SUBCOMMANDS = (
    add_trace_parser,
    add_manifest_parser,
    add_demo_data_parser,
    add_analyze_parser,
    add_plan_parser,
    add_simulate_parser,
    add_profile_parser,
    add_train_parser,
    add_runs_parser,
    add_report_parser,
    add_export_parser,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="entrain",
        description=(
            "Entrain balances microbatches for multimodal LLM training when images, audio, video "
            "and text vary from sample to sample."
        ),
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err = Console(stderr=True)
    # SIGTERM unwinds like Ctrl-C (finally blocks run: no .tmp left by a stopped `trace
    # generate`); `entrain train` takes the stop signals over while it runs
    if threading.current_thread() is not threading.main_thread():
        return _run(args, err)
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        return _run(args, err)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, err: Console) -> int:
    from entrain.cost.batch import MissingEncoderError
    from entrain.models.load import SpecError
    from entrain.workload.manifest import ManifestError

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

        if os.environ.get("ENTRAIN_DEBUG"):
            raise
        if isinstance(e, CommError):
            message = str(e)
        elif _lost_peer(e):  # in a collective (gradients, barrier, the stop flag)
            rank = os.environ.get("RANK", "?")
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            message = (
                f"rank {rank} lost a peer in a collective (did a process die? see its log): {first}"
            )
        else:
            raise
        err.print("[red]entrain: error:[/]", escape(message), highlight=False, soft_wrap=True)
        return 1
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """A rank of `entrain train` leaves its process group here, after its error (if any)
    is printed: the peers that lose it then speak after it, so the root cause is the first
    line the launcher shows. (Leaving it to the interpreter's exit aborts the process:
    gloo's threads are still running.)"""
    dist = sys.modules.get("torch.distributed")  # only when something imported it
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _exit_on_signal(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def _lost_peer(e: RuntimeError) -> bool:
    """gloo's error when the process at the other end of a collective died."""
    return any(text in str(e) for text in _PEER_GONE)


def _same_on_every_rank(e: Exception) -> bool:
    """Errors every rank of a run raises alike (bad input found before training): under
    torchrun only rank 0 prints them."""
    from entrain.config import ConfigError
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
        | CodecError
        | ConfigError,
    )


if __name__ == "__main__":
    sys.exit(main())

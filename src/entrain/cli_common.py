"""What every `entrain` command shares: the user-error type, progress bars, consoles."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from entrain.schedule import POLICIES


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


def add_policies(parser: argparse.ArgumentParser, verb: str) -> None:
    parser.add_argument(
        "--policies",
        nargs="+",
        default=list(POLICIES),
        choices=list(POLICIES),
        metavar="POLICY",
        help=f"policies to {verb} (default: all of {', '.join(POLICIES)})",
    )


def device_flag(parser: argparse.ArgumentParser, what: str) -> None:
    """--device, as train and profile take it (runtime/device.py resolves it)."""
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help=f"{what}; default auto: the GPUs when CUDA has any, else the CPU",
    )

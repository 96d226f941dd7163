"""Stopping a run on request: SIGTERM (what `timeout`, schedulers and `docker stop` send),
SIGINT (Ctrl-C), SIGHUP (a closed terminal), or the process that started this one gone.

A rank never stops in the middle of a step: its peers would wait on messages it will not
send. The signal only raises a flag; at the end of every step all ranks agree whether any of
them was asked to stop (each rank's flag rides in the step's closing collective,
runtime/train.py: a flag raised after a rank entered it counts at the next step's end), so
they all leave after the same step,
write a checkpoint when one is due or `--checkpoint-on-stop` asks, and exit 0 (not an error
code: torchrun would restart a failed run under --max-restarts). A second signal means "now":
the rank exits at once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PARENT_GONE = 1000
"""The flag's value when the parent process died rather than signalled (above every signal
number, so ranks agree on a nonzero value whichever they saw)."""


def watch_parent(parent: int, on_gone: Callable[[], None], every_s: float = 0.5) -> None:
    """Call `on_gone` (from a daemon thread) once this process's parent is no longer
    `parent`: when a parent dies its children are re-parented, and polling getppid is the
    portable way to notice (Linux's PR_SET_PDEATHSIG fires on the death of the parent's
    *thread*, not the process)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        on_gone()

    threading.Thread(target=watch, daemon=True, name="entrain-parent-watch").start()


def signal_name(signum: int) -> str:
    if signum == PARENT_GONE:
        return "the loss of its launcher (torchrun or entrain train is gone)"
    return signal.Signals(signum).name


class StopRequest:
    """The flag a stop signal raises, and the step-end agreement on it.

    `grace_s`: when the parent is gone, how long the rank may take to finish its step and
    checkpoint before it exits regardless (nobody is left to kill it)."""

    def __init__(self, grace_s: float = 120.0):
        self.signum = 0
        self.grace_s = grace_s
        self._previous: dict[int, object] = {}

    def install(self, watch: bool) -> StopRequest:
        """Take over the stop signals (main thread only); with `watch`, also stop when the
        parent process (torchrun) dies."""
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        if watch:
            watch_parent(os.getppid(), self._on_parent_gone)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        if self.signum:  # asked twice: do not wait for the step
            os._exit(128 + signum)
        self.signum = signum

    def _on_parent_gone(self) -> None:
        self.signum = self.signum or PARENT_GONE
        time.sleep(self.grace_s)
        os._exit(1)  # still here: a peer is stuck, and no one is left to kill this rank

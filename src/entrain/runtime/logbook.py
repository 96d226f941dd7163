"""Where rank 0 writes a run's per-step records: metrics.jsonl and samples.jsonl always,
TensorBoard event files under tensorboard/ when asked.

The JSON lines are the source of truth (`entrain runs`, `report` and the replay read them,
through entrain/runlog.py); the event files are a view of the same numbers for people who
watch runs in TensorBoard.
"""

from __future__ import annotations

import json
import numbers
from pathlib import Path

TENSORBOARD_DIR = "tensorboard"


class TensorBoardMissing(RuntimeError):
    """--tensorboard without the tensorboard package."""


def tensorboard_writer(log_dir: Path, start: int):
    """A SummaryWriter for `log_dir` that drops events of steps >= `start` left by a run that
    is resumed from an earlier checkpoint (as metrics.jsonl drops its lines)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's writer needs the tensorboard package
        raise TensorBoardMissing(
            "--tensorboard needs the tensorboard package: pip install 'entrain[tensorboard]'"
        ) from e
    return SummaryWriter(str(log_dir), purge_step=start if start else None)


def scalars(metrics: dict) -> dict[str, float]:
    """A step's numbers as TensorBoard tags: top-level numbers as they are, one level of
    mappings (busy time per rank, say) as "name/key"."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if k == "step":
            continue
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, dict):
            for sub, x in v.items():
                if isinstance(x, numbers.Real) and not isinstance(x, bool):
                    out[f"{k}/{sub}"] = float(x)
    return out


class Logbook:
    """Rank 0's per-step files of a run in `out`, appended to from step `start`."""

    def __init__(self, out: Path, start: int, tensorboard: bool = False):
        self.files = {
            name: open(out / f"{name}.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            for name in ("metrics", "samples")
        }
        self.board = tensorboard_writer(out / TENSORBOARD_DIR, start) if tensorboard else None

    def write(self, step: int, metrics: dict, samples: list) -> None:
        self.files["metrics"].write(json.dumps(metrics) + "\n")
        self.files["samples"].write(json.dumps({"step": step, "samples": samples}) + "\n")
        for f in self.files.values():
            f.flush()
        if self.board is not None:
            for tag, value in scalars(metrics).items():
                self.board.add_scalar(tag, value, step)
            self.board.flush()

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        if self.board is not None:
            self.board.close()

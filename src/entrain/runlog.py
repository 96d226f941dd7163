"""Reading a run's per-step logs (metrics.jsonl, samples.jsonl) back: what `runs`, `report`,
the replay and a resumed run share. Torch-free, beside config.py's run record, so the
simulator's replay reads runs without the runtime."""

from __future__ import annotations

import json
import os
from pathlib import Path

METRICS_KEYS = ("step", "loss", "iter_time", "samples_per_s", "tokens_per_s")
"""What every metrics.jsonl line holds, that `runs`, `report` and the replay read."""


def read_log(
    path: str | os.PathLike, notes: list[str] | None = None, need: tuple[str, ...] = ()
) -> list[dict]:
    """The records of a per-step JSONL log, one per line, each with the keys in `need`.

    A run stopped while rank 0 was appending a line leaves that last line cut short: it is
    left out and a note naming the file and line goes to `notes`, so a killed run can still
    be looked at. A bad line before the last one is no such accident: it is an error naming
    the file and line.
    """
    path = Path(path)
    lines = path.read_bytes().splitlines()  # bytes: a cut can split a character too
    last = max((i for i, x in enumerate(lines) if x.strip()), default=-1)
    rows = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if i == last:
                if notes is not None:
                    notes.append(
                        f"{path}: line {i + 1} is cut short (the run stopped while writing "
                        f"it?); read the {len(rows)} line(s) before it"
                    )
                break
            why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
            raise ValueError(f"{path}: line {i + 1}: not valid JSON ({why})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {i + 1}: expected a JSON object")
        missing = [k for k in need if k not in row]
        if missing:
            raise ValueError(f"{path}: line {i + 1}: no {', '.join(repr(k) for k in missing)}")
        rows.append(row)
    return rows


def read_metrics(
    run_dir: str | Path, notes: list[str] | None = None, need: tuple[str, ...] = METRICS_KEYS
) -> list[dict]:
    """A run's metrics.jsonl, one row per step with the keys in `need`; a last line cut
    short by a stop mid-write is left out with a note (see `read_log`)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{run_dir}: no metrics.jsonl (was it trained with --out {run_dir}?)")
    rows = read_log(path, notes, need)
    if not rows:
        raise ValueError(f"{path}: no steps recorded")
    return rows


def after_warmup(rows: list, warmup: int) -> list:
    """The steps medians are taken over: those after `warmup`, or all of them when the run
    has no more steps than that (`entrain runs` then says so)."""
    return rows[warmup:] or rows

"""Summaries of training runs from their metrics.jsonl (torch-free)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def summarize(run_dir: str | Path, warmup: int = 2) -> dict:
    """Median throughput after `warmup` steps, and the loss at the start and the end."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{run_dir}: no metrics.jsonl (was it trained with --out {run_dir}?)")
    rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    if not rows:
        raise ValueError(f"{path}: no steps recorded")
    steady = rows[warmup:] or rows
    return {
        "run": str(run_dir),
        "steps": len(rows),
        "samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
        "losses": [r["loss"] for r in rows],
    }

"""Summaries of training runs from their metrics.jsonl (torch-free)."""

from __future__ import annotations

import statistics
from pathlib import Path

from entrain.runlog import after_warmup, read_metrics


def summarize(run_dir: str | Path, warmup: int = 2, notes: list[str] | None = None) -> dict:
    """Median throughput after `warmup` steps (over all of them when the run has no more;
    "warmup" says how many were left out), and the loss at the start and the end."""
    rows = read_metrics(run_dir, notes)
    steady = after_warmup(rows, warmup)
    return {
        "run": str(run_dir),
        "steps": len(rows),
        "warmup": len(rows) - len(steady),
        "samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady),
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
        "losses": [r["loss"] for r in rows],
    }

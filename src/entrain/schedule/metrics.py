"""Metrics of an assignment (docs/design.md section 6), named as they appear in JSON and reports."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from entrain.cost.batch import CostedBatch
from entrain.schedule.assignment import Assignment


def work(batch: CostedBatch, asg: Assignment) -> dict[str, np.ndarray]:
    """w[m][j]: work of module m in flat microbatch j = r*M + k, shape (D*M,) per module."""
    B = asg.n_bins
    out = {
        e: np.bincount(asg.unit_bin(e), weights=u.cost, minlength=B) for e, u in batch.units.items()
    }
    out["llm"] = np.bincount(asg.llm_bin(), weights=batch.llm_cost, minlength=B)
    return out


def lower_bound(batch: CostedBatch, n_bins: int) -> dict[str, float]:
    """Per module, no placement can have a smaller maximum than this: the mean, or the
    largest indivisible unit (a unit for encoders, a whole sample for the LLM)."""
    out = {}
    for e, u in batch.units.items():
        out[e] = max(float(u.cost.sum()) / n_bins, float(u.cost.max()) if len(u) else 0.0)
    llm = batch.llm_cost
    out["llm"] = max(float(llm.sum()) / n_bins, float(llm.max()) if len(llm) else 0.0)
    return out


def deferred_tokens(batch: CostedBatch, asg: Assignment) -> np.ndarray:
    """Embedding tokens each LLM replica holds while running microbatch k, shape (D, M):
    those of units encoded at or before k whose sample's LLM work runs after k."""
    D, M = asg.dp, asg.microbatches
    diff = np.zeros(D * (M + 1))
    for e, u in batch.units.items():
        start = asg.unit_mb[e]
        end = asg.sample_mb[u.sample]
        held = start < end
        if not held.any():
            continue
        rep = asg.sample_replica[u.sample][held]
        tok = u.llm_tokens[held].astype(np.float64)
        diff += np.bincount(rep * (M + 1) + start[held], weights=tok, minlength=D * (M + 1))
        diff -= np.bincount(rep * (M + 1) + end[held], weights=tok, minlength=D * (M + 1))
    return np.cumsum(diff.reshape(D, M + 1), axis=1)[:, :M]


@dataclass
class BatchMetrics:
    """Metrics of one assignment of one global batch."""

    cv: dict[str, float]
    imbalance: dict[str, float]
    bound_gap: dict[str, float]
    worst_cv: float
    stretch: float
    peak_deferred: float


def evaluate(batch: CostedBatch, asg: Assignment) -> BatchMetrics:
    """All section-6 metrics of `asg`. Modules with no work in the batch count as perfectly
    balanced (cv 0, imbalance 1) and are left out of `stretch`."""
    w = work(batch, asg)
    lb = lower_bound(batch, asg.n_bins)
    cv, imb, gap = {}, {}, {}
    ratios = []
    for m, wm in w.items():
        mean = float(wm.mean())
        if mean <= 0:
            cv[m], imb[m], gap[m] = 0.0, 1.0, 0.0
            continue
        cv[m] = float(wm.std() / mean)
        imb[m] = float(wm.max() / mean)
        gap[m] = float(wm.max() / lb[m] - 1.0)
        ratios.append(wm / mean)
    stretch = float(np.max(ratios, axis=0).mean()) if ratios else 1.0
    return BatchMetrics(
        cv=cv,
        imbalance=imb,
        bound_gap=gap,
        worst_cv=max(cv.values()),
        stretch=stretch,
        peak_deferred=float(deferred_tokens(batch, asg).max(initial=0.0)),
    )


def mean_metrics(rows: list[BatchMetrics]) -> dict:
    """Means over iterations, as docs/design.md prescribes for every aggregate."""
    if not rows:
        raise ValueError("no iterations to aggregate")
    out: dict = {}
    for key in ("cv", "imbalance", "bound_gap"):
        mods = rows[0].__dict__[key].keys()
        out[key] = {m: float(np.mean([r.__dict__[key][m] for r in rows])) for m in mods}
    for key in ("worst_cv", "stretch", "peak_deferred"):
        out[key] = float(np.mean([r.__dict__[key] for r in rows]))
    return out

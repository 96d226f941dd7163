"""Fitting the cost model to measured timings.

A module's time on a microbatch whose units have x_1..x_n tokens is modelled as

    t = a * sum(x) + b * sum(x^2) + c0 * n + call

the per-unit model of cost/flops.py summed over the microbatch, plus a fixed cost per run.
Observations are whole microbatches (what the runtime times), not single units: the fit
learns the per-unit terms from batches of different sizes and counts. It minimizes the
*relative* error (rows weighted by 1/t), since timings span orders of magnitude and a 10%
miss on a small microbatch matters as much as one on a large one. Every coefficient is kept
non-negative: a negative per-token cost would make some batch cost less than nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from entrain.cost.flops import CostCoeffs

TERMS = ("a", "b", "c0", "call")


@dataclass(frozen=True)
class FitResult:
    """Fitted coefficients and how well they explain the timings they came from."""

    coeffs: CostCoeffs
    rel_rms: float
    """Root mean square of (predicted - measured) / measured."""
    max_rel: float
    """Largest |predicted - measured| / measured."""
    runs: int

    def to_dict(self) -> dict:
        return {
            **{t: getattr(self.coeffs, t) for t in TERMS},
            "rel_rms": self.rel_rms,
            "max_rel": self.max_rel,
            "runs": self.runs,
        }


def features(tokens: Sequence[np.ndarray]) -> np.ndarray:
    """(runs, 4) design matrix: sum x, sum x^2, unit count, 1 (per run)."""
    rows = []
    for x in tokens:
        x = np.asarray(x, dtype=np.float64)
        rows.append((x.sum(), (x * x).sum(), float(len(x)), 1.0 if len(x) else 0.0))
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(TERMS))


def nonnegative_lstsq(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min ||A c - y|| subject to c >= 0, by the Lawson-Hanson active-set method (a handful
    of columns, so a plain loop is fine). Columns are scaled to unit norm first: sum(x^2)
    and a constant differ by many orders of magnitude."""
    n = A.shape[1]
    scale = np.linalg.norm(A, axis=0)
    scale[scale == 0] = 1.0
    As = A / scale
    c = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    for _ in range(3 * n + 10):
        w = As.T @ (y - As @ c)
        candidates = ~passive & (w > 1e-12 * max(1.0, float(np.abs(w).max(initial=0.0))))
        if not candidates.any():
            break
        passive[int(np.argmax(np.where(candidates, w, -np.inf)))] = True
        while True:
            s = np.zeros(n)
            s[passive] = np.linalg.lstsq(As[:, passive], y, rcond=None)[0]
            if (s[passive] > 0).all():
                c = s
                break
            # step back to the boundary and drop the coefficients that hit zero
            mask = passive & (s <= 0)
            gap = c[mask] - s[mask]  # >= 0: c >= 0 >= s there
            alpha = float(np.min(np.divide(c[mask], gap, out=np.zeros_like(gap), where=gap > 0)))
            c = c + alpha * (s - c)
            passive &= c > 1e-15
            c[~passive] = 0.0
    return c / scale


def fit_coeffs(
    tokens: Sequence[np.ndarray], seconds: Sequence[float], terms: Sequence[str] = TERMS
) -> FitResult:
    """Fit `terms` (a subset of a, b, c0, call; the others stay 0) to timed runs: `tokens[i]`
    holds the unit sizes of run i, `seconds[i]` its measured time."""
    y = np.asarray(seconds, dtype=np.float64)
    if len(tokens) != len(y):
        raise ValueError(f"{len(tokens)} runs but {len(y)} timings")
    if len(y) < len(terms):
        raise ValueError(f"fitting {len(terms)} terms needs at least that many runs, got {len(y)}")
    if (y <= 0).any():
        raise ValueError("timings must be positive")
    unknown = set(terms) - set(TERMS)
    if unknown:
        raise ValueError(f"unknown terms {sorted(unknown)}; choose from {TERMS}")
    cols = [TERMS.index(t) for t in terms]
    A = features(tokens)[:, cols]
    w = 1.0 / y  # relative error
    c = nonnegative_lstsq(A * w[:, None], np.ones_like(y))
    values = dict.fromkeys(TERMS, 0.0)
    values.update({t: float(v) for t, v in zip(terms, c)})
    rel = (A @ c - y) / y
    return FitResult(
        coeffs=CostCoeffs(**values),
        rel_rms=float(np.sqrt(np.mean(rel**2))),
        max_rel=float(np.abs(rel).max()),
        runs=len(y),
    )


def predict(coeffs: CostCoeffs, tokens: Sequence[np.ndarray]) -> np.ndarray:
    """Predicted seconds of each run."""
    c = np.array([getattr(coeffs, t) for t in TERMS])
    return features(tokens) @ c

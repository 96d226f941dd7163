"""Macro statistics: how the per-module work ratio of a global batch varies with its size.

The static plan rests on this: the ratio of encoder work to LLM work of a global batch of N
samples concentrates around its mean (its coefficient of variation shrinks like 1/sqrt(N)),
so GPUs split by the mean ratio stay right for every batch, up to a vanishing term.
"""

from __future__ import annotations

import numpy as np

from entrain.cost.batch import CostedBatch


def ratio_cv(
    batch: CostedBatch, sizes: list[int], draws: int = 64, seed: int = 0
) -> dict[int, dict[str, float]]:
    """cv across random global batches of each size of (encoder work / LLM work), per
    encoder; `batch` is a large pool of samples to draw from."""
    rng = np.random.default_rng(seed)
    enc = {e: batch.module_cost_per_sample(e) for e in batch.units}
    llm = batch.llm_cost
    out: dict[int, dict[str, float]] = {}
    for n in sizes:
        if n > batch.n_samples:
            continue
        idx = np.stack([rng.choice(batch.n_samples, size=n, replace=False) for _ in range(draws)])
        l_tot = llm[idx].sum(axis=1)
        out[n] = {}
        for e, c in enc.items():
            r = c[idx].sum(axis=1) / l_tot
            out[n][e] = float(r.std() / r.mean()) if r.mean() > 0 else 0.0
    return out

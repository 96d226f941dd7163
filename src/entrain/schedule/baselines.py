"""The baseline policies of docs/design.md section 3. Each returns an Assignment for one batch."""

from __future__ import annotations

import numpy as np

from entrain.cost.batch import CostedBatch
from entrain.schedule.assignment import Assignment
from entrain.schedule.packing import (
    largest_first,
    lpt,
    lpt_groups,
    normalized,
    vector_greedy,
    vector_greedy_groups,
)


def _replicas_then_microbatches(key: np.ndarray, dp: int, microbatches: int) -> np.ndarray:
    """LPT across replicas, then LPT across each replica's microbatches, as data-parallel
    trainers balance: the flat bin r*M + k of each sample."""
    rep = lpt(key, dp)
    mb = lpt_groups(key, rep, dp, microbatches)
    return rep * microbatches + mb


def sequential(batch: CostedBatch, dp: int, microbatches: int) -> Assignment:
    """Dataset order, equal sample counts per microbatch (what a plain DataLoader does)."""
    n, B = batch.n_samples, dp * microbatches
    return Assignment.coupled(batch, dp, microbatches, (np.arange(n) * B) // max(n, 1))


def llm_balanced(batch: CostedBatch, dp: int, microbatches: int) -> Assignment:
    """Balances LLM cost only, as text-LLM trainers balance sequence lengths."""
    return Assignment.coupled(
        batch, dp, microbatches, _replicas_then_microbatches(batch.llm_cost, dp, microbatches)
    )


def heaviest_encoder(batch: CostedBatch) -> str | None:
    """The encoder with the most work in this batch, or None when no encoder has any."""
    totals = {e: float(u.cost.sum()) for e, u in batch.units.items()}
    best = max(totals, key=totals.get, default=None)
    return best if best is not None and totals[best] > 0 else None


def encoder_balanced(batch: CostedBatch, dp: int, microbatches: int) -> Assignment:
    """Balances the heaviest encoder's cost only (samples without its items spread by count)."""
    enc = heaviest_encoder(batch)
    key = batch.module_cost_per_sample(enc) if enc else batch.llm_cost
    return Assignment.coupled(
        batch, dp, microbatches, _replicas_then_microbatches(key, dp, microbatches)
    )


def joint_bins(batch: CostedBatch, dp: int, microbatches: int) -> np.ndarray:
    """Flat bins of the coupled vector-balanced assignment (shared with Entrain's fallback)."""
    vecs = normalized(batch.cost_matrix())
    order = largest_first(vecs)  # both packings place the samples in this order
    rep = vector_greedy(vecs, dp, order)
    mb = vector_greedy_groups(vecs, rep, dp, microbatches, order)
    return rep * microbatches + mb


def joint(batch: CostedBatch, dp: int, microbatches: int) -> Assignment:
    """Coupled samples, greedy vector balancing of every module's cost at once."""
    return Assignment.coupled(batch, dp, microbatches, joint_bins(batch, dp, microbatches))


def encoder_rebalance(batch: CostedBatch, dp: int, microbatches: int) -> Assignment:
    """LLM-balanced microbatches, then for each microbatch index the encoder items of all
    replicas are pooled and spread evenly (LPT) over the replicas' encoders; embeddings go
    back to the replica that owns the sample (VeOmni's EncoderDataBalance, DistTrain).
    Items move whole: this baseline does not split an item into its units."""
    base = llm_balanced(batch, dp, microbatches)
    unit_replica, unit_mb = {}, {}
    for e, u in batch.units.items():
        n_items = u.n_items
        item_cost = np.bincount(u.item, weights=u.cost, minlength=n_items)
        item_sample = np.zeros(n_items, dtype=np.int64)
        item_sample[u.item] = u.sample
        item_slot = base.sample_mb[item_sample]
        item_rep = lpt_groups(item_cost, item_slot, microbatches, dp)
        unit_replica[e] = item_rep[u.item]
        unit_mb[e] = item_slot[u.item]
    return Assignment(
        dp, microbatches, base.sample_replica, base.sample_mb, unit_replica, unit_mb, "item"
    )

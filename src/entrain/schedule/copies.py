"""Which copy encodes each unit when an encoder runs on several ranks of a replica.

How a policy splits an encoder microbatch over the encoder's copies is part of the policy,
and the simulator and the runtime read it from here, so a simulated copy does the work the
real one will:

- "sample" (the coupled baselines): each copy encodes whole samples of the microbatch,
  dealt in turn as a data-parallel encoder gets its share of a replica's samples
  (Megatron-LM, VeOmni); text-only samples take their turn too. Nothing balances the copies.
- "item" (encoder-rebalance): its all-to-all moves whole items (an image, a clip): items go
  largest first to the least loaded copy.
- "unit" (Entrain): units (an item's chunks: frame groups, audio windows) go largest first
  to the least loaded copy, so the copies finish together.
In both, which copy takes a microbatch's largest share rotates with the microbatch, so the
copies' loads also even out over the iteration.
"""

from __future__ import annotations

import numpy as np

from entrain.cost.batch import CostedBatch
from entrain.schedule.assignment import Assignment
from entrain.schedule.packing import lpt_groups

COPY_RULES = ("sample", "item", "unit")


def unit_copies(batch: CostedBatch, asg: Assignment, encoder: str, copies: int) -> np.ndarray:
    """The copy (0..copies-1) that encodes each unit of `encoder`, by the assignment's rule."""
    u = batch.units[encoder]
    if copies <= 1 or len(u) == 0:
        return np.zeros(len(u), dtype=np.int64)
    ebin = asg.unit_bin(encoder)
    rule = asg.copy_rule
    # LPT gives a microbatch's largest share to copy 0; the copies run independently (a
    # rank each, forwards ahead), so over an iteration that copy would carry far more than
    # its share (one large video a microbatch: all of them). The copy that takes the
    # largest share rotates with the microbatch instead.
    if rule == "unit":
        return (lpt_groups(u.cost, ebin, asg.n_bins, copies) + ebin) % copies
    if rule == "item":
        n_items = u.n_items
        item_cost = np.bincount(u.item, weights=u.cost, minlength=n_items)
        item_bin = np.zeros(n_items, dtype=np.int64)
        item_bin[u.item] = ebin  # an item's units share a bin under this rule
        return ((lpt_groups(item_cost, item_bin, asg.n_bins, copies) + item_bin) % copies)[u.item]
    if rule == "sample":
        return (_position_in_bin(asg.llm_bin()) % copies)[u.sample]
    raise ValueError(f"copy rule must be one of {', '.join(COPY_RULES)}, got {rule!r}")


def _position_in_bin(bins: np.ndarray) -> np.ndarray:
    """Each sample's place among its microbatch's samples, in sample order."""
    order = np.argsort(bins, kind="stable")
    sorted_bins = bins[order]
    first = np.searchsorted(sorted_bins, sorted_bins)  # where each one's bin begins
    pos = np.empty(len(bins), dtype=np.int64)
    pos[order] = np.arange(len(bins)) - first
    return pos


def copy_work(
    batch: CostedBatch, asg: Assignment, encoder: str, copies: int, work: np.ndarray
) -> np.ndarray:
    """(bins, copies): the work (`work` per unit: forward or backward) of each copy in each
    encoder microbatch; a microbatch takes as long as its busiest copy."""
    B = asg.n_bins
    copy = unit_copies(batch, asg, encoder, copies)
    flat = asg.unit_bin(encoder) * copies + copy
    return np.bincount(flat, weights=work, minlength=B * copies).reshape(B, copies)

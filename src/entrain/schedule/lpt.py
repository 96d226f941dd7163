"""LPT, the longest-processing-time-first balancer, alone (`lpt`) and inside groups in
lockstep (`lpt_groups`): the policies' scalar balancer, and `place_units`' replica spread.

Both place many items per numpy step: `lpt` a round of items over many bins, one each, and
`lpt_groups` all items of one cost in a group at once, where equal costs come in runs (a
video's frame groups). They place exactly what one item at a time would
(tests/test_scheduler_speedup.py keeps that version as a reference).
"""

from __future__ import annotations

import heapq

import numpy as np


def lpt(costs: np.ndarray, n_bins: int) -> np.ndarray:
    """Longest-processing-time-first: each item, largest first, goes to the lightest bin.

    Items that cost nothing go to the bins holding the fewest items, so a balancer that is
    blind to them (text-only samples for an encoder balancer) does not pile them into one
    microbatch. Ties go to the lower bin index: every rank computes the same placement.
    """
    costs = np.asarray(costs, dtype=np.float64)
    order = np.argsort(-costs, kind="stable")
    c = costs[order]
    n_pos = int(np.count_nonzero(c > 0))  # they come first; the rest cost nothing
    bins = np.full(costs.shape[0], -1, dtype=np.int64)
    place = _lpt_rounds if n_bins >= 32 else _lpt_heap
    bins[order[:n_pos]] = place(c[:n_pos], n_bins)
    free = np.flatnonzero(bins < 0)
    if free.size:
        counts = np.bincount(bins[bins >= 0], minlength=n_bins)
        bins[free] = _fill_by_count(counts, free.size)
    return bins


def _lpt_heap(c: np.ndarray, n_bins: int) -> list[int]:
    """LPT's bin for each item of cost c (> 0, largest first): the least (load, items, bin)."""
    out = [0] * c.shape[0]
    heap = [(0.0, 0, b) for b in range(n_bins)]
    for i, ci in enumerate(c.tolist()):
        load, count, b = heap[0]
        heapq.heapreplace(heap, (load + ci, count + 1, b))
        out[i] = b
    return out


def _lpt_rounds(c: np.ndarray, n_bins: int) -> np.ndarray:
    """`_lpt_heap`, many items per numpy round: over many bins, a run of items goes to the
    bins in order of (load, items, bin), one each, as long as each next bin is still below
    every bin already given an item in the round (ties end the round: the next round's sort
    settles them)."""
    n = c.shape[0]
    load, count = np.zeros(n_bins), np.zeros(n_bins, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    index = np.arange(n_bins)
    t = 0
    while t < n:
        by = np.lexsort((index, count, load))[: min(n_bins, n - t)]  # next bins, in turn
        after = load[by] + c[t : t + by.shape[0]]  # each bin's load after its item
        ok = load[by[1:]] < np.minimum.accumulate(after)[:-1]
        j = by.shape[0] if ok.all() else int(ok.argmin()) + 1
        load[by[:j]] = after[:j]
        count[by[:j]] += 1
        out[t : t + j] = by[:j]
        t += j
    return out


def _fill_by_count(counts: np.ndarray, n: int) -> np.ndarray:
    """Bins for n more items, each to the bin with the fewest items so far."""
    out = np.empty(n, dtype=np.int64)
    heap = [(int(c), b) for b, c in enumerate(counts)]
    heapq.heapify(heap)
    for i in range(n):
        c, b = heap[0]
        heapq.heapreplace(heap, (c + 1, b))
        out[i] = b
    return out


RUN = 32  # fewest items of one cost in some group for `lpt_groups` to place them at once


def lpt_groups(
    costs: np.ndarray,
    group: np.ndarray,
    n_groups: int,
    n_bins: int,
    targets: np.ndarray | None = None,
) -> np.ndarray:
    """LPT inside each group, in lockstep across groups; with `targets` (groups, bins) an item
    goes to the bin left with the smallest excess over its target instead of the lightest.
    Items that cost nothing go to the bin of their group with the fewest items.

    One numpy step places one item in every group, so the loop runs as many times as the
    largest group has items. When the items have few distinct costs (a video's frame groups
    come in a few sizes), it instead runs once per distinct cost and places all items of
    that cost at once (`_lpt_run`), which is the same placement.
    """
    n = costs.shape[0]
    out = np.zeros(n, dtype=np.int64)
    if n == 0:
        return out
    order = np.lexsort((-costs, group))
    g_sorted = group[order]
    loads = np.zeros((n_groups, n_bins))
    if targets is not None:
        loads -= targets  # (C order: steps update it through a flat view)
    counts = np.zeros((n_groups, n_bins))
    c_sorted = costs[order]
    free = not bool((c_sorted > 0).all())  # some item goes by count
    runs = 1 + np.count_nonzero((c_sorted[1:] != c_sorted[:-1]) | (g_sorted[1:] != g_sorted[:-1]))
    if 4 * runs > n:  # items of one cost in one group come in short runs
        _lpt_lockstep(costs, group, order, loads, counts, out, free)
        return out
    # items by cost (largest first), then group, then their order inside the group
    seq = order[np.lexsort((g_sorted, -c_sorted))]
    c, g = costs[seq], group[seq]
    cut = np.flatnonzero((c[1:] != c[:-1]) | (g[1:] != g[:-1])) + 1
    run_start = np.concatenate([[0], cut])  # runs: items of one group and one cost
    run_end = np.concatenate([cut, [n]])
    run_cost, run_group = c[run_start], g[run_start]
    new_cost = np.flatnonzero(np.concatenate([[True], run_cost[1:] != run_cost[:-1], [True]]))
    longest = np.maximum.reduceat(run_end - run_start, new_cost[:-1])  # per distinct cost
    if np.add.reduceat(run_end - run_start, new_cost[:-1])[longest >= RUN].sum() < n / 2:
        _lpt_lockstep(costs, group, order, loads, counts, out, free)  # runs too short to pay
        return out
    pending = 0  # seq[pending:first] waits to be placed item by item
    for a, z in zip(new_cost[:-1].tolist(), new_cost[1:].tolist(), strict=True):
        v, gs, n_g = run_cost[a], run_group[a:z], run_end[a:z] - run_start[a:z]
        first, last = int(run_start[a]), int(run_end[z - 1])
        if n_g.max() < RUN:  # too few per group for a run to pay: wait in line
            continue
        _lpt_lockstep(costs, group, seq[pending:first], loads, counts, out, free)
        pending = first
        placed = _lpt_run(loads if v > 0 else counts, gs, n_g, v if v > 0 else 1.0)
        if placed is None:
            continue
        bins, got = placed
        if v > 0:  # (a run that costs nothing went by count, and no later item reads loads)
            counts[gs] += got
        out[seq[first:last]] = bins
        pending = last
    _lpt_lockstep(costs, group, seq[pending:], loads, counts, out, free)
    return out


def _lpt_lockstep(
    costs: np.ndarray,
    group: np.ndarray,
    items: np.ndarray,
    loads: np.ndarray,
    counts: np.ndarray,
    out: np.ndarray,
    free: bool,
) -> None:
    """Place `items` (each group's in its LPT order) one per group per numpy step.

    Groups that have run out of items take an item of cost 0 that counts for nothing, so a
    step is a few calls on whole (groups, bins) arrays; item counts are kept only when
    `free` (some item of the call costs nothing, and goes by count).
    """
    if items.size == 0:
        return
    G, n_bins = loads.shape
    items = items[np.argsort(group[items], kind="stable")]
    g_sorted = group[items]
    rank = np.arange(items.size) - np.searchsorted(g_sorted, np.arange(G))[g_sorted]
    steps = int(rank.max()) + 1
    cost = np.zeros((steps, G))  # item t of every group (0: none left)
    cost[rank, g_sorted] = costs[items]
    live = np.zeros((steps, G))
    live[rank, g_sorted] = 1.0
    flat_loads, flat_counts = loads.reshape(-1), counts.reshape(-1)
    assert np.shares_memory(flat_loads, loads) and np.shares_memory(flat_counts, counts)
    base = np.arange(G) * n_bins
    choice = np.empty((steps, G), dtype=np.int64)
    for t in range(steps):
        c = cost[t]
        b = loads.argmin(axis=1)
        if free:
            b = np.where(c > 0, b, counts.argmin(axis=1))
            flat_counts[base + b] += live[t]
        flat_loads[base + b] += c
        choice[t] = b
    out[items] = choice[rank, g_sorted]


def _lpt_run(
    loads: np.ndarray, rows: np.ndarray, n: np.ndarray, v: float, most: int = 1 << 21
) -> tuple[np.ndarray, np.ndarray] | None:
    """Place n[i] items of equal cost v > 0 in row rows[i] of `loads` (updated), each to the
    lightest bin (the first on ties), as LPT would one by one; None (nothing placed) when
    that would take more than `most` numbers, or more than placing them one by one would
    cost, as when a few small items fill a wide gap.

    With equal costs, bin b is picked when its load is loads[b], loads[b] + v, ... (each
    sum rounded as LPT rounds it), and LPT picks the smallest of all these in turn: so item
    i goes to the bin of the i-th smallest (load, bin, turn). Only bins under the water
    level the items fill up to take part, each with turns enough to reach it; a check that
    every such bin kept a turn it did not take, and that every other bin starts above the
    last item taken, proves that nothing was left out.
    Returns the bins of the items (row by row) and how many each bin got (rows, bins).
    """
    R, D = rows.size, loads.shape[1]
    x = loads[rows]  # (R, D)
    low = np.sort(x, axis=1)
    level = (n[:, None] * v + np.cumsum(low, axis=1)) / np.arange(1, D + 1)  # k lightest
    top = level[np.arange(R), np.maximum((low <= level).sum(axis=1), 1) - 1]
    part = x <= (top + v)[:, None]  # (R, D): bins that may take an item
    P = int(part.sum(axis=1).max())
    turns = int(np.ceil(float(((top - low[:, 0]) / v).max()))) + 2
    if R * P * (turns + 1) > min(most, 256 * int(n.max())):  # one by one is cheaper
        return None
    pick = np.argsort(~part, axis=1, kind="stable")[:, :P]  # (R, P) those bins, in order
    start = np.where(np.take_along_axis(part, pick, axis=1), np.take_along_axis(x, pick, 1), np.inf)
    steps = np.empty((R, P, turns + 1))
    steps[:, :, 0] = start
    steps[:, :, 1:] = v
    np.cumsum(steps, axis=2, out=steps)  # each bin's loads turn by turn, rounded as LPT
    flat = steps.reshape(R, -1)
    order = np.argsort(flat, axis=1, kind="stable")[:, : int(n.max())]
    take = np.arange(order.shape[1]) < n[:, None]
    slot = order[take] // (turns + 1)  # row by row
    row = np.repeat(np.arange(R), n)
    got = np.bincount(row * P + slot, minlength=R * P).reshape(R, P)
    last = flat[np.arange(R), order[np.arange(R), n - 1]]  # the last item taken, per row
    outside = np.where(part, np.inf, x).min(axis=1)
    if got.max() > turns or (outside <= last).any():
        return None
    bins = pick[row, slot]
    counts = np.zeros((R, D), dtype=np.int64)
    counts[np.arange(R)[:, None], pick] = got
    new = np.take_along_axis(steps, got[:, :, None], axis=2)[:, :, 0]
    x[np.arange(R)[:, None], pick] = np.where(np.isinf(start), x[np.arange(R)[:, None], pick], new)
    loads[rows] = x
    return bins, counts

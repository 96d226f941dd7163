"""Packing kernels shared by the policies: scalar LPT, vector greedy, and placing encoder units
into (microbatch, replica) bins under deadlines.

Hot loops run over bins or over rounds, never over samples with per-sample objects; where a
loop over items is unavoidable (LPT, greedy) it touches Python floats only.
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
    out = [0] * len(costs)
    order = np.argsort(-costs, kind="stable")
    heap = [(0.0, 0, b) for b in range(n_bins)]
    for i, c in zip(order.tolist(), costs[order].tolist()):
        load, count, b = heap[0]
        if c > 0:
            heapq.heapreplace(heap, (load + c, count + 1, b))
        else:  # the rest cost nothing: spread them by count
            out[i] = -1
            continue
        out[i] = b
    bins = np.asarray(out, dtype=np.int64)
    free = np.flatnonzero(bins < 0)
    if free.size:
        counts = np.bincount(bins[bins >= 0], minlength=n_bins)
        bins[free] = _fill_by_count(counts, free.size)
    return bins


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


def normalized(costs: np.ndarray) -> np.ndarray:
    """Columns of an (n, K) cost matrix divided by their totals; all-zero columns stay zero.

    Vector balancing compares modules on this common scale, so no module wins by its units.
    """
    tot = costs.sum(axis=0)
    return np.divide(costs, tot, out=np.zeros_like(costs, dtype=np.float64), where=tot > 0)


def vector_greedy(vecs: np.ndarray, n_bins: int) -> np.ndarray:
    """Greedy vector bin balancing of (n, K) normalized costs into `n_bins` bins.

    Items go largest-first (by their largest component) to the bin whose resulting largest
    component is smallest (the lowest such bin on ties). The loop runs once per item, so it
    is written over Python floats, column by column; two modules (one encoder and the LLM,
    the common case) get an unrolled loop.
    """
    n, K = vecs.shape
    order = np.argsort(-vecs.max(axis=1), kind="stable")
    cols = [[0.0] * n_bins for _ in range(K)]
    out = [0] * n
    rows = vecs[order].tolist()
    bins = range(n_bins)
    if K == 2:
        c0, c1 = cols
        for i, (v0, v1) in zip(order.tolist(), rows):
            best, best_s = 0, np.inf
            for b in bins:
                x, y = c0[b] + v0, c1[b] + v1
                s = x if x > y else y
                if s < best_s:
                    best, best_s = b, s
            c0[best] += v0
            c1[best] += v1
            out[i] = best
    else:
        for i, v in zip(order.tolist(), rows):
            cand = [[x + vk for x in col] for col, vk in zip(cols, v)]
            worst = list(map(max, *cand)) if K > 1 else cand[0]
            best = worst.index(min(worst))
            for k in range(K):
                cols[k][best] = cand[k][best]
            out[i] = best
    return np.asarray(out, dtype=np.int64)


def vector_greedy_groups(
    vecs: np.ndarray, group: np.ndarray, n_groups: int, n_bins: int
) -> np.ndarray:
    """`vector_greedy` run independently inside each group, all groups in lockstep.

    Used to pack each replica's samples into its M microbatches: one numpy step places one
    item in every group at once, so the loop runs N/D times instead of N. Groups that have
    run out of items place a zero vector, which changes nothing.
    """
    n, K = vecs.shape
    out = np.zeros(n, dtype=np.int64)
    if n == 0:
        return out
    order = np.lexsort((-vecs.max(axis=1), group))
    g_sorted = group[order]
    rank = np.arange(n) - np.searchsorted(g_sorted, np.arange(n_groups))[g_sorted]
    steps = int(rank.max()) + 1
    table = np.full((n_groups, steps), n, dtype=np.int64)  # n points at a zero row
    table[g_sorted, rank] = order
    padded = np.concatenate([vecs, np.zeros((1, K))])[table]  # (groups, steps, K)
    loads = np.zeros((n_groups, n_bins, K))
    rows = np.arange(n_groups)
    choice = np.empty((n_groups, steps), dtype=np.int64)
    for t in range(steps):
        v = padded[:, t, :]
        b = (loads + v[:, None, :]).max(axis=2).argmin(axis=1)
        loads[rows, b] += v
        choice[:, t] = b
    real = table < n
    out[table[real]] = choice[real]
    return out


def lpt_groups(
    costs: np.ndarray,
    group: np.ndarray,
    n_groups: int,
    n_bins: int,
    targets: np.ndarray | None = None,
) -> np.ndarray:
    """LPT inside each group, in lockstep across groups; with `targets` (groups, bins) an item
    goes to the bin left with the smallest excess over its target instead of the lightest.
    Items that cost nothing go to the bin of their group with the fewest items."""
    n = costs.shape[0]
    out = np.zeros(n, dtype=np.int64)
    if n == 0:
        return out
    order = np.lexsort((-costs, group))
    g_sorted = group[order]
    start = np.searchsorted(g_sorted, np.arange(n_groups))
    rank = np.arange(n) - start[g_sorted]
    table = np.full((n_groups, int(rank.max()) + 1), -1, dtype=np.int64)
    table[g_sorted, rank] = order
    loads = np.zeros((n_groups, n_bins)) if targets is None else -np.asarray(targets, np.float64)
    counts = np.zeros((n_groups, n_bins))
    for t in range(table.shape[1]):
        col = table[:, t]
        g = np.flatnonzero(col >= 0)
        items = col[g]
        c = costs[items]
        b = np.where(c > 0, loads[g].argmin(axis=1), counts[g].argmin(axis=1))
        loads[g, b] += c
        counts[g, b] += 1
        out[items] = b
    return out


def _cut(positions: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Index of the interval of `bounds` (cumulative ends) that holds each position."""
    return np.searchsorted(bounds, positions, side="right")


def place_units(
    cost: np.ndarray,
    deadline: np.ndarray,
    targets: np.ndarray,
    fine: float = 0.01,
    repair_steps: int | None = None,
    lookahead: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Place encoder units into M microbatches x D replicas, each unit no later than its
    deadline microbatch (and, with `lookahead`, no more than that many microbatches
    earlier), so that each bin's work comes close to its target (M, D).

    1. Time: units in deadline order (largest first within a deadline) fill the microbatches
       front to back up to their total target; a unit never passes its deadline. This is
       earliest-deadline-first filling: it pulls work forward only as far as capacity allows,
       which also keeps the embeddings waiting for the LLM to the least needed.
    2. Space: inside a microbatch, units over `fine` of a bin go by LPT to the replica
       furthest below its target, the rest are cut in order against what each still lacks.
    3. Repair: single moves and swaps out of the bin furthest over its target, to any bin its
       deadline allows, while they lower that excess.
    Returns (microbatch, replica) of each unit.
    """
    M, D = targets.shape
    U = cost.shape[0]
    if U == 0:
        z = np.zeros(0, dtype=np.int64)
        return z, z
    by_cost = np.argsort(-cost, kind="stable")
    order = _stable_by(deadline, by_cost)  # by deadline, largest first within one
    c, d = cost[order], deadline[order]
    pos = np.cumsum(c) - c / 2
    earliest = np.zeros_like(d) if lookahead is None else np.maximum(d - lookahead, 0)
    slot = np.clip(_cut(pos, np.cumsum(targets.sum(axis=1))), earliest, d)
    position = np.empty(U, dtype=np.int64)
    position[order] = np.arange(U)
    rep = _spread_in_slots(c, slot, targets, fine, position[by_cost])  # by_cost, re-indexed
    q = slot * D + rep
    steps = 2 * M * D if repair_steps is None else repair_steps
    q = _repair(c, earliest * D, (d + 1) * D, q, targets.ravel(), steps)
    out_q = np.empty(U, dtype=np.int64)
    out_q[order] = q
    return np.divmod(out_q, D)


def _stable_by(key: np.ndarray, order: np.ndarray) -> np.ndarray:
    """`order` re-sorted by a small integer key, keeping its order among equal keys.

    A stable sort on 16-bit keys is a radix sort in numpy: linear time, several times
    faster than lexsort on the hundred thousand units of a video-heavy batch.
    """
    k = key[order]
    k = k.astype(np.int16) if k.size and k.max() < 2**15 else k
    return order[np.argsort(k, kind="stable")]


def _spread_in_slots(
    c: np.ndarray, slot: np.ndarray, targets: np.ndarray, fine: float, by_cost: np.ndarray
) -> np.ndarray:
    """Replica of each unit inside its microbatch (its slot); `by_cost` orders the units
    largest first.

    Units larger than `fine` times the slot's mean target go by LPT, largest first, to the
    replica furthest below its target; what is left is small, and is cut in order against
    what each replica still lacks (error under `fine`/2 of a bin at each cut). LPT first
    also gives every bin a mix of sizes, so the repair step has small units to move.
    """
    M, D = targets.shape
    U = c.shape[0]
    order = _stable_by(slot, by_cost)  # by slot, largest first inside it
    per_bin = np.maximum(targets.mean(axis=1), 1e-300)
    is_big = c[order] > fine * per_bin[slot[order]]
    big, small = order[is_big], order[~is_big]  # both still by slot, largest first
    rep = np.zeros(U, dtype=np.int64)
    rep[big] = lpt_groups(c[big], slot[big], M, D, targets)
    if small.size == 0:
        return rep
    load = np.bincount(slot[big] * D + rep[big], weights=c[big], minlength=M * D).reshape(M, D)
    cs, ss = c[small], slot[small]
    remaining = np.bincount(ss, weights=cs, minlength=M)
    lack = np.maximum(targets - load, 0.0)
    tot = lack.sum(axis=1, keepdims=True)
    # What is left of each slot is shared in proportion to what each replica still lacks;
    # a slot already at or over target everywhere shares it evenly.
    share = np.where(tot > 0, lack / np.where(tot > 0, tot, 1.0), 1.0 / D)
    bounds = np.cumsum(share * remaining[:, None], axis=1)
    offset = np.concatenate([[0.0], np.cumsum(remaining)[:-1]])
    flat_bounds = (bounds + offset[:, None]).ravel()
    pos = np.cumsum(cs) - cs / 2
    qq = np.clip(_cut(pos, flat_bounds), ss * D, ss * D + D - 1)
    rep[small] = qq - ss * D
    return rep


def _repair(
    c: np.ndarray,
    low: np.ndarray,
    limit: np.ndarray,
    q: np.ndarray,
    target: np.ndarray,
    steps: int,
    swap_bins: int = 4,
    sample: int = 48,
    good_enough: float = 5e-4,
) -> np.ndarray:
    """Lower the largest excess over target by moving or swapping single units.

    Unit u may sit in bins [low[u], limit[u]) (bins are numbered k*D + r, so this is a
    window of microbatches ending at its deadline).
    Swaps are tried with the `swap_bins` bins furthest under target that can take a unit of
    the worst bin: they fix a bin that holds only large units, which no single move can.
    A bin with many units offers a spread `sample` of them (its smallest and largest among
    them), which keeps each step cheap; it stops once the worst bin is within
    `good_enough` of a mean bin of its target.
    """
    B = target.shape[0]
    load = np.bincount(q, weights=c, minlength=B)
    bins = np.arange(B)
    members_of = _members(q, B)
    stop = good_enough * max(float(target.mean()), 1e-300)
    for _ in range(steps):
        excess = load - target
        hi = int(excess.argmax())
        top = excess[hi]
        if top <= stop or not members_of[hi]:
            break
        members = _spread_sample(members_of[hi], c, sample)
        cm, lm, lo_m = c[members], limit[members], low[members]
        allowed = (bins[None, :] < lm[:, None]) & (bins[None, :] >= lo_m[:, None])
        allowed[:, hi] = False
        new = np.where(
            allowed, np.maximum(top - cm[:, None], excess[None, :] + cm[:, None]), np.inf
        )
        i, j = np.unravel_index(int(new.argmin()), new.shape)
        best, action = new[i, j], (members[i], None, int(j))
        reachable = np.flatnonzero((bins < lm.max()) & (bins >= lo_m.min()) & (bins != hi))
        for lo in reachable[np.argsort(excess[reachable])[:swap_bins]].tolist():
            others = _spread_sample(members_of[lo], c, sample)
            others = others[(hi < limit[others]) & (hi >= low[others])]
            if others.size == 0:
                continue
            delta = cm[:, None] - c[others][None, :]  # work leaving hi
            ok = (delta > 0) & (lo < lm[:, None]) & (lo >= lo_m[:, None])
            sw = np.where(ok, np.maximum(top - delta, excess[lo] + delta), np.inf)
            a, b = np.unravel_index(int(sw.argmin()), sw.shape)
            if sw[a, b] < best:
                best, action = sw[a, b], (members[a], others[b], lo)
        if best >= top - 1e-12 * abs(top):
            break
        u, v, dest = (int(x) if x is not None else None for x in action)
        _relocate(u, hi, dest, q, load, c, members_of)
        if v is not None:
            _relocate(v, dest, hi, q, load, c, members_of)
    return q


def _members(q: np.ndarray, n_bins: int) -> list[list[int]]:
    """Unit indices of each bin, as lists that moves can update in place."""
    order = np.argsort(q, kind="stable")
    cuts = np.searchsorted(q[order], np.arange(1, n_bins))
    return [part.tolist() for part in np.split(order, cuts)]


def _spread_sample(members: list[int], c: np.ndarray, k: int) -> np.ndarray:
    """At most about k members of a bin, evenly spaced, plus its smallest and largest unit."""
    m = np.asarray(members, dtype=np.int64)
    if m.size <= k:
        return m
    cm = c[m]
    pick = np.unique(np.concatenate([m[:: m.size // k + 1], m[[cm.argmin(), cm.argmax()]]]))
    return pick


def _relocate(
    u: int,
    src: int,
    dst: int,
    q: np.ndarray,
    load: np.ndarray,
    c: np.ndarray,
    members_of: list[list[int]],
) -> None:
    load[src] -= c[u]
    load[dst] += c[u]
    q[u] = dst
    members_of[src].remove(u)
    members_of[dst].append(u)

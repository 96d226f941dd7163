"""Packing kernels shared by the policies: scalar LPT (lpt.py), vector greedy, and placing
encoder units into (microbatch, replica) bins under deadlines (its repair step: repair.py).

Hot loops run over rounds that place many items per numpy step (LPT over many bins, all
items of one cost), over lockstep groups or over repair steps, never over samples with
per-sample objects; where a loop over single items is unavoidable (greedy over a few bins)
it touches Python floats only. Every kernel places exactly what its one-item-at-a-time
version placed (tests/test_scheduler_speedup.py keeps those versions as references).
"""

from __future__ import annotations

import numpy as np

# LPT lives in lpt.py; the policies (and copies.py) take it from here as they always did
from entrain.schedule.lpt import lpt as lpt
from entrain.schedule.lpt import lpt_groups as lpt_groups
from entrain.schedule.repair import repair


def normalized(costs: np.ndarray) -> np.ndarray:
    """Columns of an (n, K) cost matrix divided by their totals; all-zero columns stay zero.

    Vector balancing compares modules on this common scale, so no module wins by its units.
    """
    tot = costs.sum(axis=0)
    return np.divide(costs, tot, out=np.zeros_like(costs, dtype=np.float64), where=tot > 0)


def vector_greedy(vecs: np.ndarray, n_bins: int) -> np.ndarray:
    """Greedy vector bin balancing of (n, K) normalized costs into `n_bins` bins.

    Items go largest-first (by their largest component) to the bin whose resulting largest
    component is smallest (the lowest such bin on ties). The loop runs once per item: over
    few bins it is written over Python floats, column by column (unrolled for two and three
    modules, the common cases); over many bins (one per replica at D=128) each item is one
    numpy step over all bins instead.
    """
    n, K = vecs.shape
    order = np.argsort(-vecs.max(axis=1), kind="stable")
    rows = vecs[order].tolist()
    pick = _greedy_numpy if n_bins > 24 else _greedy_python
    out = np.empty(n, dtype=np.int64)
    out[order] = pick(rows, n_bins, K)
    return out


def _greedy_python(rows: list[list[float]], n_bins: int, K: int) -> list[int]:
    """`vector_greedy`'s choices, item by item, in Python floats."""
    cols = [[0.0] * n_bins for _ in range(K)]
    out = [0] * len(rows)
    bins = range(n_bins)
    # A bin is dropped as soon as one of its components reaches the best so far: its
    # largest component can then no longer be strictly smaller.
    if K == 2:
        c0, c1 = cols
        for i, (v0, v1) in enumerate(rows):
            best, best_s = 0, np.inf
            for b in bins:
                s = c0[b] + v0
                if s >= best_s:
                    continue
                y = c1[b] + v1
                if y > s:
                    if y >= best_s:
                        continue
                    s = y
                best, best_s = b, s
            c0[best] += v0
            c1[best] += v1
            out[i] = best
    elif K == 3:
        c0, c1, c2 = cols
        for i, (v0, v1, v2) in enumerate(rows):
            best, best_s = 0, np.inf
            for b in bins:
                s = c0[b] + v0
                if s >= best_s:
                    continue
                y = c1[b] + v1
                if y > s:
                    if y >= best_s:
                        continue
                    s = y
                z = c2[b] + v2
                if z > s:
                    if z >= best_s:
                        continue
                    s = z
                best, best_s = b, s
            c0[best] += v0
            c1[best] += v1
            c2[best] += v2
            out[i] = best
    else:
        for i, v in enumerate(rows):
            cand = [[x + vk for x in col] for col, vk in zip(cols, v, strict=True)]
            worst = list(map(max, *cand)) if K > 1 else cand[0]
            best = worst.index(min(worst))
            for k in range(K):
                cols[k][best] = cand[k][best]
            out[i] = best
    return out


def _greedy_numpy(rows: list[list[float]], n_bins: int, K: int) -> list[int]:
    """`vector_greedy`'s choices, one numpy step over all bins per item (into preallocated
    arrays: at a few microseconds per item, allocations would cost as much as the work)."""
    cols = np.zeros((K, n_bins))
    worst, col = np.empty(n_bins), np.empty(n_bins)
    add, larger = np.add, np.maximum
    out = [0] * len(rows)
    if K == 2:
        c0, c1 = cols
        for i, (v0, v1) in enumerate(rows):
            larger(add(c0, v0, out=worst), add(c1, v1, out=col), out=worst)
            b = int(worst.argmin())
            c0[b] += v0
            c1[b] += v1
            out[i] = b
        return out
    for i, v in enumerate(rows):
        add(cols[0], v[0], out=worst)
        for k in range(1, K):
            larger(worst, add(cols[k], v[k], out=col), out=worst)
        b = int(worst.argmin())
        for k in range(K):
            cols[k, b] += v[k]
        out[i] = b
    return out


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
    # (steps, K, groups, 1): item t of every group, one array per module, ready to broadcast
    items = np.concatenate([vecs, np.zeros((1, K))])[table.T].transpose(0, 2, 1)[..., None].copy()
    cols = np.zeros((K, n_groups, n_bins))  # each module's load per group and bin
    flat = [cols[k].reshape(-1) for k in range(K)]  # views, to add an item to its bin
    worst, col = np.empty((n_groups, n_bins)), np.empty((n_groups, n_bins))
    base = np.arange(n_groups) * n_bins
    choice = np.empty((steps, n_groups), dtype=np.int64)
    add, larger = np.add, np.maximum
    for t in range(steps):  # a handful of numpy calls per step, into preallocated arrays
        v = items[t]
        add(cols[0], v[0], out=worst)
        for k in range(1, K):
            larger(worst, add(cols[k], v[k], out=col), out=worst)
        b = worst.argmin(axis=1)
        at = base + b
        for k in range(K):
            flat[k][at] += v[k, :, 0]
        choice[t] = b
    real = table < n
    out[table[real]] = choice.T[real]
    return out


def _cut(
    positions: np.ndarray, bounds: np.ndarray, rising: bool | None = None, dtype=np.int64
) -> np.ndarray:
    """Index of the interval of `bounds` (cumulative ends) that holds each position, i.e.
    how many bounds are <= it, as `dtype`. `rising` says the positions never fall (None:
    look).

    Rising positions (a cumulative sum) are cut the other way round: each of the few bounds
    is looked up among the positions, and the intervals are laid out between them.
    """
    n = positions.shape[0]
    if rising is None:
        rising = bool((positions[1:] >= positions[:-1]).all())
    if not (rising and (bounds[1:] >= bounds[:-1]).all()):
        return np.searchsorted(bounds, positions, side="right").astype(dtype, copy=False)
    first = np.searchsorted(positions, bounds, side="left")  # first position >= each bound
    return np.repeat(
        np.arange(bounds.shape[0] + 1, dtype=dtype), np.diff(first, prepend=0, append=n)
    )


def place_units(
    cost: np.ndarray,
    deadline: np.ndarray,
    targets: np.ndarray,
    fine: float = 0.01,
    repair_steps: int | None = None,
    lookahead: int | None = None,
    cap: float | None = None,
    ranks: Ranks | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """`place_bins`, as (microbatch, replica) of each unit (or None)."""
    bins = place_bins(cost, deadline, targets, fine, repair_steps, lookahead, cap, ranks)
    return None if bins is None else split_bins(bins, targets.shape[1])


def split_bins(bins: np.ndarray, D: int) -> tuple[np.ndarray, np.ndarray]:
    """(bins // D, bins % D) of non-negative bins; by shift and mask when D is a power of 2."""
    if D & (D - 1) == 0:
        return bins >> (D.bit_length() - 1), bins & (D - 1)
    return np.divmod(bins, D)


def place_bins(
    cost: np.ndarray,
    deadline: np.ndarray,
    targets: np.ndarray,
    fine: float = 0.01,
    repair_steps: int | None = None,
    lookahead: int | None = None,
    cap: float | None = None,
    ranks: Ranks | None = None,
) -> np.ndarray | None:
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
    Returns the bin (microbatch * D + replica) of each unit; or None, with `cap`, when some
    bin is sure to end with more work than `cap` (`sure_over`), before the repair is run
    for nothing.
    `ranks`, when given, is `cost_ranks(cost)`, for callers that place the same units more
    than once.
    """
    M, D = targets.shape
    U = cost.shape[0]
    if U == 0:
        return np.zeros(0, dtype=np.int64)
    if deadline.min() < 0 or deadline.max() >= M:
        raise ValueError(f"deadlines must be microbatches 0..{M - 1}")
    if ranks is None:
        ranks = cost_ranks(cost)
    # Arrays of U units are few, small and updated in place where the values stay the same:
    # a video-heavy batch has 150k units, and fresh arrays of that size cost page faults.
    small = np.int16 if M < 2**15 else np.int64  # microbatch indices
    order = ranks.sort_by(deadline, M)  # by deadline, largest first within one
    c = cost[order]
    d = np.repeat(np.arange(M, dtype=small), np.bincount(deadline, minlength=M))  # sorted
    pos = np.cumsum(c)
    pos -= c / 2
    # positions rise (unless rounding of tiny units says otherwise), and so do the slots:
    # the repair then finds a bin's units in its slot's stretch
    by_slot = bool((pos[1:] >= pos[:-1]).all())
    slot = _cut(pos, np.cumsum(targets.sum(axis=1)), by_slot, small)
    del pos
    if lookahead is None:
        earliest = np.zeros_like(d)
        np.minimum(slot, d, out=slot)  # (slot >= 0: the clip to earliest..d)
    else:
        earliest = np.maximum(d - min(lookahead, M), 0)
        np.clip(slot, earliest, d, out=slot)
    q = _spread_in_slots(cost, order, slot, targets, fine, ranks)
    del slot
    target = targets.ravel()
    load = np.bincount(q, weights=c, minlength=target.shape[0])
    if cap is not None and sure_over(load, target, float(c.max()), cap):
        return None
    steps = 2 * M * D if repair_steps is None else repair_steps
    q = repair(c, earliest, d, D, q, target, steps, by_slot=by_slot, load=load)
    out = np.empty(U, dtype=np.int64)
    out[order] = q
    return out


def sure_over(load: np.ndarray, target: np.ndarray, largest: float, cap: float) -> bool:
    """Whether some bin is sure to hold more than `cap` of work however the repair goes on
    from bins holding `load` (units at most `largest`); Entrain then rejects the placement.

    A repair step takes work only out of the bin of largest excess over target (the others
    only gain), and leaves both bins it touches below that excess, so the largest excess
    never rises, and never falls below the mean excess. A bin that is never the worst again
    keeps at least its load; one that is, keeps at least that mean excess minus the largest
    unit after its last turn. So no bin ends under min(load, target + mean - largest unit)
    (less a tolerance for rounding, far above what the sums can drift).
    """
    floor = float((load - target).mean())
    lower = np.minimum(load, target + floor - largest)
    return bool(lower.max(initial=-np.inf) > cap + 1e-9 * (abs(cap) + float(load.sum())))


class Ranks:
    """Each unit's cost as a rank among the distinct costs (0: the largest), so that
    sorting by (key, rank) is sorting by key, then cost largest first, then unit index.

    Sorting unit arrays is most of `place_units` on a video-heavy batch (150k units); a
    stable sort of 16-bit integers is a radix sort in numpy, linear and several times faster
    than sorting costs, and the costs of a batch take a few hundred values. So a key and a
    rank are packed in one 16-bit number when they fit; otherwise the units are sorted by
    cost once (and then stably by key).
    """

    def __init__(self, rank: np.ndarray, n: int):
        self.n = n  # distinct costs: ranks 0..n-1
        self.rank = rank.astype(np.int16, copy=False) if n <= 2**15 else rank  # (U,)
        self._by_cost: np.ndarray | None = None

    def subset(self, units: np.ndarray) -> Ranks:
        """The ranks of some of the units (in their own numbering)."""
        return Ranks(self.rank[units], self.n)

    def sort_by(self, key: np.ndarray, n_keys: int) -> np.ndarray:
        """Units sorted by `key` (integers 0..n_keys-1), then cost (largest first), then
        index."""
        if self.n * n_keys <= 2**15:
            packed = key.astype(np.int16)
            packed *= self.n
            packed += self.rank
            return np.argsort(packed, kind="stable")
        if self._by_cost is None:
            self._by_cost = np.argsort(self.rank, kind="stable")
        k = key[self._by_cost]
        if n_keys <= 2**15:
            k = k.astype(np.int16)
        return self._by_cost[np.argsort(k, kind="stable")]


def cost_ranks(cost: np.ndarray) -> Ranks:
    """`Ranks` of the costs of some units. A video's frame groups come in runs of equal cost
    (150k units, a few thousand runs): then the runs are ranked, and their ranks laid out."""
    n = cost.shape[0]
    change = np.flatnonzero(cost[1:] != cost[:-1]) + 1
    few_runs = 8 * change.size < n
    values = cost[np.concatenate([[0], change])] if few_runs else cost
    distinct, inverse = np.unique(values, return_inverse=True)
    inverse = inverse.reshape(-1)
    n_distinct = distinct.shape[0]
    if n_distinct and np.isnan(distinct[-1]):  # NaN sorts last, as in np.argsort(-cost)
        rank = np.where(inverse == n_distinct - 1, n_distinct - 1, n_distinct - 2 - inverse)
    else:
        rank = n_distinct - 1 - inverse  # 0: the largest
    if n_distinct <= 2**15:
        rank = rank.astype(np.int16)  # (before it is laid out over the units)
    if few_runs:
        rank = np.repeat(rank, np.diff(np.concatenate([[0], change, [n]])))
    return Ranks(rank, int(n_distinct))


def _spread_in_slots(
    cost: np.ndarray,
    order: np.ndarray,
    slot: np.ndarray,
    targets: np.ndarray,
    fine: float,
    ranks: Ranks,
) -> np.ndarray:
    """Bin (slot * D + replica) of each unit inside its microbatch (its slot): the unit
    order[i] has slot[i], and the result is indexed the same way; `ranks` orders the units
    by cost.

    Units larger than `fine` times the slot's mean target go by LPT, largest first, to the
    replica furthest below its target; what is left is small, and is cut in order against
    what each replica still lacks (error under `fine`/2 of a bin at each cut). LPT first
    also gives every bin a mix of sizes, so the repair step has small units to move.
    """
    M, D = targets.shape
    U = cost.shape[0]
    small_ints = np.int16 if M * D < 2**15 else np.int64  # slots and bins fit
    of_unit = np.empty(U, dtype=small_ints)
    of_unit[order] = slot  # each unit's slot, by unit
    units = ranks.sort_by(of_unit, M)  # by slot, largest first inside it
    s = of_unit[units]
    del of_unit
    c = cost[units]
    edge = fine * np.maximum(targets.mean(axis=1), 1e-300)  # (M,) smallest unit that is big
    q = np.empty(U, dtype=np.int64)  # each unit's bin, by unit
    if c.size and c.max() > edge.min():
        is_big = c > edge[s]
        big, c_big, s_big = units[is_big], c[is_big], s[is_big]
        q_big = s_big * D + lpt_groups(c_big, s_big, M, D, targets)
        q[big] = q_big
        load = np.bincount(q_big, weights=c_big, minlength=M * D).reshape(M, D)
        small = ~is_big
        units, c, s = units[small], c[small], s[small]
    else:
        load = np.zeros((M, D))
    if units.size:
        remaining = np.bincount(s, weights=c, minlength=M)
        lack = np.maximum(targets - load, 0.0)
        tot = lack.sum(axis=1, keepdims=True)
        # What is left of each slot is shared in proportion to what each replica still lacks;
        # a slot already at or over target everywhere shares it evenly.
        share = np.where(tot > 0, lack / np.where(tot > 0, tot, 1.0), 1.0 / D)
        bounds = np.cumsum(share * remaining[:, None], axis=1)
        offset = np.concatenate([[0.0], np.cumsum(remaining)[:-1]])
        flat_bounds = (bounds + offset[:, None]).ravel()
        pos = np.cumsum(c)
        c *= 0.5  # (c is ours: halved in place, c / 2 exactly)
        pos -= c
        del c
        cut = _cut(pos, flat_bounds, dtype=small_ints)
        del pos
        first = s * small_ints(D)  # the slot's first bin: the cut stays inside the slot
        cut -= first
        np.clip(cut, 0, D - 1, out=cut)
        cut += first
        q[units] = cut
        del units, cut
    return q[order]

"""Packing kernels shared by the policies: scalar LPT (lpt.py), vector greedy, and placing
encoder units into (microbatch, replica) bins under deadlines (its repair step: repair.py).

Hot loops run over rounds that place many items per numpy step (LPT over many bins, all
items of one cost), over lockstep groups or over repair steps, never over samples with
per-sample objects; where a loop over single items is unavoidable (greedy over a few bins)
it touches Python floats only. Every kernel places exactly what its one-item-at-a-time
version placed (tests/test_scheduler_speedup.py keeps those versions as references).
"""

from __future__ import annotations

import threading

import numpy as np
from numpy.typing import DTypeLike

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


def largest_first(vecs: np.ndarray) -> np.ndarray:
    """The rows of (n, K) costs by their largest component, largest first (then by index):
    the order in which the vector greedy places items."""
    top = vecs[:, 0].copy()
    for k in range(1, vecs.shape[1]):  # vecs.max(axis=1), many times faster on few columns
        np.maximum(top, vecs[:, k], out=top)
    return np.argsort(-top, kind="stable")


def vector_greedy(vecs: np.ndarray, n_bins: int, order: np.ndarray | None = None) -> np.ndarray:
    """Greedy vector bin balancing of (n, K) normalized costs into `n_bins` bins.

    Items go largest-first (by their largest component) to the bin whose resulting largest
    component is smallest (the lowest such bin on ties). The loop runs once per item: over
    few bins it is written over Python floats, column by column (unrolled for two and three
    modules, the common cases); over many bins (one per replica at D=128) each item is one
    numpy step over all bins instead. `order`, when given, is `largest_first(vecs)`.
    """
    n = vecs.shape[0]
    out = np.empty(n, dtype=np.int64)
    if n == 0:
        return out
    if order is None:
        order = largest_first(vecs)
    # one list of floats per module (not a list per item: that costs as much as the loop)
    cols = vecs[order].T.tolist()
    if n_bins > 24:
        out[order] = _greedy_numpy(cols, n_bins)
    else:  # (NaN compares false whichever module comes first, so then keep their order)
        out[order] = _greedy_python(cols, n_bins, reorder=not np.isnan(vecs).any())
    return out


def _greedy_python(items: list[list[float]], n_bins: int, reorder: bool = True) -> list[int]:
    """`vector_greedy`'s choices, item by item, in Python floats; `items` holds one list
    per module (the items' components, in placement order). `reorder`: the modules may be
    looked at in any order (no component is NaN)."""
    K = len(items)
    cols = [[0.0] * n_bins for _ in range(K)]
    n = len(items[0])
    out: list[int] = []
    bins = range(n_bins)
    if K not in (2, 3):
        for v in zip(*items):
            cand = [[x + vk for x in col] for col, vk in zip(cols, v, strict=True)]
            worst = list(map(max, *cand)) if K > 1 else cand[0]
            best = worst.index(min(worst))
            for k in range(K):
                cols[k][best] = cand[k][best]
            out.append(best)
        return out
    # A bin is dropped as soon as one of its components reaches the best so far: its
    # largest component can then no longer be strictly smaller. The order in which the
    # modules are looked at changes no choice, only how soon bins are dropped; so every
    # `_BLOCK` items, the module that is the largest in most bins is looked at first (then
    # most bins are dropped at their first component: a quarter less work on a batch
    # that one module binds, as the LLM binds a video batch).
    for lo in range(0, n, _BLOCK):
        hi = min(lo + _BLOCK, n)
        largest = [0] * K
        for loads in zip(*cols):
            largest[loads.index(max(loads))] += 1
        first = sorted(range(K), key=lambda k: -largest[k] if reorder else 0)  # (stable)
        c = [cols[k] for k in first]
        v = [items[k][lo:hi] for k in first]
        out += _greedy_block2(*c, *v, bins) if K == 2 else _greedy_block3(*c, *v, bins)
    return out


_BLOCK = 256  # items placed between two choices of the module order


def _greedy_block2(
    c0: list[float], c1: list[float], r0: list[float], r1: list[float], bins: range
) -> list[int]:
    """`_greedy_python` for two modules over some items (components r0, r1), adding them
    into the bins' loads c0, c1."""
    out = []
    inf = np.inf
    for v0, v1 in zip(r0, r1):
        best, best_s = 0, inf
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
        out.append(best)
    return out


def _greedy_block3(
    c0: list[float],
    c1: list[float],
    c2: list[float],
    r0: list[float],
    r1: list[float],
    r2: list[float],
    bins: range,
) -> list[int]:
    """`_greedy_block2` for three modules."""
    out = []
    inf = np.inf
    for v0, v1, v2 in zip(r0, r1, r2):
        best, best_s = 0, inf
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
        out.append(best)
    return out


def _greedy_numpy(items: list[list[float]], n_bins: int) -> list[int]:
    """`vector_greedy`'s choices, one numpy step over all bins per item (into preallocated
    arrays: at a few microseconds per item, allocations would cost as much as the work);
    `items` as in `_greedy_python`."""
    K = len(items)
    cols = np.zeros((K, n_bins))
    worst, col = np.empty(n_bins), np.empty(n_bins)
    add, larger = np.add, np.maximum
    out = [0] * len(items[0])
    if K == 2:
        c0, c1 = cols
        for i, (v0, v1) in enumerate(zip(*items)):
            larger(add(c0, v0, out=worst), add(c1, v1, out=col), out=worst)
            b = int(worst.argmin())
            c0[b] += v0
            c1[b] += v1
            out[i] = b
        return out
    for i, v in enumerate(zip(*items)):
        add(cols[0], v[0], out=worst)
        for k in range(1, K):
            larger(worst, add(cols[k], v[k], out=col), out=worst)
        b = int(worst.argmin())
        for k in range(K):
            cols[k, b] += v[k]
        out[i] = b
    return out


def vector_greedy_groups(
    vecs: np.ndarray,
    group: np.ndarray,
    n_groups: int,
    n_bins: int,
    order: np.ndarray | None = None,
) -> np.ndarray:
    """`vector_greedy` run independently inside each group, all groups in lockstep.

    Used to pack each replica's samples into its M microbatches: one numpy step places one
    item in every group at once, so the loop runs N/D times instead of N. Groups that have
    run out of items place a zero vector, which changes nothing. `order`, when given, is
    `largest_first(vecs)`.
    """
    n, K = vecs.shape
    out = np.zeros(n, dtype=np.int64)
    if n == 0:
        return out
    if order is None:
        order = largest_first(vecs)
    # by group, largest first inside each (a stable sort of 16-bit keys is a radix sort)
    key = group[order]
    order = order[np.argsort(key.astype(np.int16) if n_groups <= 2**15 else key, kind="stable")]
    g_sorted = group[order]
    rank = np.arange(n) - np.searchsorted(g_sorted, np.arange(n_groups))[g_sorted]
    steps = int(rank.max()) + 1
    table = np.full((n_groups, steps), n, dtype=np.int64)  # n points at a zero row
    table[g_sorted, rank] = order
    # (steps, K, groups, 1): item t of every group, one array per module, ready to broadcast
    items = np.concatenate([vecs, np.zeros((1, K))])[table.T].transpose(0, 2, 1)[..., None].copy()
    # A step is a handful of numpy calls on preallocated arrays (each costs about a
    # microsecond, the work itself almost nothing): every module's load with the item
    # added in every bin (`cand`), their largest, the best bin of each group; then the
    # chosen bins' new loads are copied over from `cand`, the very sums `+=` would make,
    # through one flat index (fancy indexing on one axis is several times faster).
    cols = np.zeros((K, n_groups, n_bins))  # each module's load per group and bin
    cand = np.empty_like(cols)
    flat_cols, flat_cand = cols.reshape(-1), cand.reshape(-1)  # views
    worst = np.empty((n_groups, n_bins))
    first = (np.arange(K)[:, None] * n_groups + np.arange(n_groups)) * n_bins  # (K, groups)
    at = np.empty((K, n_groups), dtype=np.int64)  # flat index of each chosen bin's loads
    flat_at = at.reshape(-1)
    choice = np.empty((steps, n_groups), dtype=np.int64)
    add, larger = np.add, np.maximum
    c0, rest = cand[0], [cand[k] for k in range(1, K)]
    for t in range(steps):
        add(cols, items[t], out=cand)
        b = choice[t]
        if rest:
            larger(c0, rest[0], out=worst)
            for ck in rest[1:]:
                larger(worst, ck, out=worst)
            worst.argmin(axis=1, out=b)
        else:
            c0.argmin(axis=1, out=b)
        add(first, b, out=at)
        flat_cols[flat_at] = flat_cand[flat_at]
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


class _Scratch(threading.local):
    """Work arrays that `place_bins` reuses from one call to the next, one set per thread.

    A video-heavy batch has 150k units, and place_bins works in several float and index
    arrays of that size. Allocated afresh for every batch, their memory came from pages the
    C library had handed back to the system when the previous batch's arrays were freed,
    and faulting those pages in again took about 2 ms of a 20 ms schedule. Kept here, they
    are faulted in once. Nothing place_bins returns is one of them; arrays for more than
    `MAX` units are not kept.
    """

    MAX = 1 << 20

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, n: int, dtype: DTypeLike) -> np.ndarray:
        """An array of n items of `dtype`, its contents left over from an earlier call."""
        a = self.arrays.get(name)
        if a is None or a.shape[0] < n or a.dtype != dtype:
            a = np.empty(n, dtype=dtype)
            if n <= self.MAX:
                self.arrays[name] = a
        return a[:n]


_scratch = _Scratch()


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
    # The arrays of U units are few, small (16-bit microbatches) and updated in place where
    # the values stay the same; the larger ones are kept between calls (`_Scratch`).
    small = np.int16 if M < 2**15 else np.int64  # microbatch indices
    # by deadline, largest first within one
    order, runs = ranks.sort_by_runs(deadline, M, out=_scratch.get("order", U, np.int64))
    # (take's default mode, "raise", would take into a temporary first; the indices are valid)
    c = np.take(cost, order, out=_scratch.get("c", U, cost.dtype), mode="clip")
    if runs is None:
        run_length, count = None, np.bincount(deadline, minlength=M)  # units per deadline
    else:  # (the same, counted over the runs)
        run_length, run_deadline = runs
        count = np.bincount(run_deadline, weights=run_length, minlength=M).astype(np.int64)
    d = np.repeat(np.arange(M, dtype=small), count)  # sorted
    pos = np.cumsum(c, out=_scratch.get("pos", U, c.dtype))
    half = np.multiply(c, 0.5, out=_scratch.get("half", U, c.dtype))  # c / 2 exactly
    pos -= half
    # positions rise (unless rounding of tiny units says otherwise), and so do the slots:
    # the repair then finds a bin's units in its slot's stretch
    by_slot = bool((pos[1:] >= pos[:-1]).all())
    slot = _cut(pos, np.cumsum(targets.sum(axis=1)), by_slot, small)
    if lookahead is None:
        earliest = np.broadcast_to(np.zeros(1, dtype=small), d.shape)  # (zeros, no memory)
        np.minimum(slot, d, out=slot)  # (slot >= 0: the clip to earliest..d)
    else:
        earliest = np.maximum(d - min(lookahead, M), 0)
        np.clip(slot, earliest, d, out=slot)
    perm, s = _slot_order(order, slot, ranks, M, run_length)
    del slot
    q = _spread_in_slots(c, perm, s, targets, fine, (pos, half))
    del s
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
    cost once (and then stably by key). When the packed keys come in long runs of equal
    neighbours (a video's frame groups: one cost and one sample, so one key, about 40 in a
    row), the runs are sorted instead of the units (`_sorted_runs`).
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
        return self.sort_by_runs(key, n_keys)[0]

    def sort_by_runs(
        self, key: np.ndarray, n_keys: int, out: np.ndarray | None = None
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
        """`sort_by`, and when it was found by sorting runs, the (length, key) of each run
        in sorted order: stretches of the result that hold consecutive units of one key and
        one cost (None otherwise). `out`, an int64 array of one item per unit, may take
        the result."""
        if self.n * n_keys <= 2**15:
            packed = key.astype(np.int16)
            packed *= self.n
            packed += self.rank
            runs = _sorted_runs(packed)
            if runs is None:
                return np.argsort(packed, kind="stable"), None
            first, length = runs
            return _lay_out(first, length, packed.shape[0], out), (length, key[first])
        if self._by_cost is None:
            self._by_cost = np.argsort(self.rank, kind="stable")
        k = key[self._by_cost]
        if n_keys <= 2**15:
            k = k.astype(np.int16)
        return self._by_cost[np.argsort(k, kind="stable")], None


def _sorted_runs(key: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The runs of equal neighbours in `key`, as (first index, length), in the order in which
    `np.argsort(key, kind="stable")` lays them out; None unless they are few (under 1/8 of
    the items), when sorting them would not pay.

    A run of equal keys stays together, in index order, in a stable sort, so sorting the
    runs by key (stably: runs of one key keep their index order) and laying out each run's
    indices (`_lay_out`) is the same permutation, for a few thousand runs instead of 150k
    items.
    """
    n = key.shape[0]
    start = np.flatnonzero(key[1:] != key[:-1])
    if 8 * start.size >= n:
        return None
    start += 1
    start = np.concatenate([np.zeros(1, dtype=start.dtype), start])
    length = np.diff(start, append=n)
    by = np.argsort(key[start], kind="stable")
    return start[by], length[by]


def _lay_out(
    first: np.ndarray, length: np.ndarray, n: int, out: np.ndarray | None = None
) -> np.ndarray:
    """The ranges first[i] .. first[i] + length[i] - 1, one after the other (every length
    >= 1, n in all), in `out` (an int64 array of n) or a new one: ones, with the jump to
    each range's first index put where it starts, summed in place."""
    if out is None:
        out = np.empty(n, dtype=np.int64)
    out.fill(1)
    step = first.astype(out.dtype)  # (a copy)
    step[1:] -= first[:-1] + length[:-1] - 1  # from the last index of the range before
    out[np.cumsum(length) - length] = step
    np.cumsum(out, dtype=out.dtype, out=out)
    return out


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


def _slot_order(
    order: np.ndarray,
    slot: np.ndarray,
    ranks: Ranks,
    M: int,
    run_length: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The units of `order` (order[i] has slot[i]) sorted by slot, then cost (largest first),
    then index, as positions in `order` (`perm`), and their slots in that order (`s`, sorted).

    `run_length`, when given, cuts `order` into runs of consecutive units of one cost
    (`Ranks.sort_by_runs`). Cut further where the slot changes, they are pieces of units
    with consecutive indices and one (slot, cost), which the sort keeps together in index
    order; so sorting the few pieces by (slot, cost, first unit) and laying them out sorts
    the units. Otherwise the units are sorted by (slot, cost) and looked up in `order`.
    """
    U = order.shape[0]
    if run_length is not None:
        run_start = np.cumsum(run_length) - run_length
        change = np.flatnonzero(slot[1:] != slot[:-1])
        change += 1
        if 8 * (run_start.size + change.size) < U:
            start = np.sort(np.concatenate([run_start, change]))
            start = start[np.concatenate([[True], start[1:] != start[:-1]])]  # (union1d)
            length = np.diff(start, append=U)
            unit, piece_slot = order[start], slot[start]
            by = np.lexsort((unit, ranks.rank[unit], piece_slot))
            perm = _lay_out(start[by], length[by], U, _scratch.get("perm", U, np.int64))
            return perm, np.repeat(piece_slot[by], length[by])
    of_unit = np.empty(U, dtype=slot.dtype)
    of_unit[order] = slot  # each unit's slot, by unit
    units = ranks.sort_by(of_unit, M)
    where = np.empty(U, dtype=np.int64)
    where[order] = np.arange(U)  # each unit's position in `order`
    return where[units], of_unit[units]


def _spread_in_slots(
    c: np.ndarray,
    perm: np.ndarray,
    s: np.ndarray,
    targets: np.ndarray,
    fine: float,
    buffers: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """Bin (slot * D + replica) of each unit inside its microbatch (its slot), indexed as
    its cost in `c`: `perm` lists the indices of `c` by slot, largest first inside it (then
    by unit), and `s` their slots (`_slot_order`); `buffers` are two float arrays of c's
    size to work in (their contents are lost).

    Units larger than `fine` times the slot's mean target go by LPT, largest first, to the
    replica furthest below its target; what is left is small, and is cut in order against
    what each replica still lacks (error under `fine`/2 of a bin at each cut). LPT first
    also gives every bin a mix of sizes, so the repair step has small units to move.
    """
    M, D = targets.shape
    U = c.shape[0]
    small_ints = np.int16 if M * D < 2**15 else np.int64  # slots and bins fit
    s = s.astype(small_ints, copy=False)
    pos, cs = buffers
    np.take(c, perm, out=cs, mode="clip")  # costs in slot order (as in place_bins)
    edge = fine * np.maximum(targets.mean(axis=1), 1e-300)  # (M,) smallest unit that is big
    q = _scratch.get("q", U, np.int64)  # each unit's bin, indexed as c
    start = np.searchsorted(s, np.arange(M + 1))  # where each slot's units start
    if _any_over(cs, start, edge):
        is_big = cs > edge[s]
        big, c_big, s_big = perm[is_big], cs[is_big], s[is_big]
        q_big = s_big * np.int64(D) + lpt_groups(c_big, s_big, M, D, targets)
        q[big] = q_big
        load = np.bincount(q_big, weights=c_big, minlength=M * D).reshape(M, D)
        small = ~is_big
        perm, cs, s = perm[small], cs[small], s[small]
        pos = pos[: cs.shape[0]]
        start = np.searchsorted(s, np.arange(M + 1))
    else:  # (as common as it is cheap to know: no unit is big, all are cut)
        load = np.zeros((M, D))
    if cs.size:
        remaining = _slot_sums(cs, start, pos)
        lack = np.maximum(targets - load, 0.0)
        tot = lack.sum(axis=1, keepdims=True)
        # What is left of each slot is shared in proportion to what each replica still lacks;
        # a slot already at or over target everywhere shares it evenly.
        share = np.where(tot > 0, lack / np.where(tot > 0, tot, 1.0), 1.0 / D)
        bounds = np.cumsum(share * remaining[:, None], axis=1)
        offset = np.concatenate([[0.0], np.cumsum(remaining)[:-1]])
        flat_bounds = (bounds + offset[:, None]).ravel()
        np.cumsum(cs, out=pos)
        cs *= 0.5  # (a buffer of ours: halved in place, c / 2 exactly)
        pos -= cs
        cut = _cut(pos, flat_bounds, dtype=small_ints)
        first = s * small_ints(D)  # the slot's first bin: the cut stays inside the slot
        cut -= first
        np.clip(cut, 0, D - 1, out=cut)
        cut += first
        q[perm] = cut
    return q


def _any_over(c: np.ndarray, start: np.ndarray, edge: np.ndarray) -> bool:
    """Whether some c[i] > edge[k] for i in start[k]..start[k+1]-1 (start rising): one
    maximum per slot, not a comparison per unit. False where some c is NaN, as the test
    this replaces, `c.max() > edge.min()`, said."""
    full = start[:-1] < start[1:]
    if not full.any():
        return False
    top = np.maximum.reduceat(c, start[:-1][full])  # (NaN where a slot has one)
    return bool((top > edge[full]).any()) and not np.isnan(top).any()


def _slot_sums(c: np.ndarray, start: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """np.bincount(s, weights=c, minlength=M) for the sorted slots s whose stretches of c
    begin at `start` (M + 1 of them), bit for bit: bincount adds each slot's weights (as
    float64) one by one onto 0.0, as a running sum (into `scratch`, of c's size) does;
    adding its last value onto 0.0 as well makes the sign of an all-zero sum the same."""
    M = start.shape[0] - 1
    out = np.zeros(M)
    if c.dtype != np.float64 or scratch.dtype != np.float64:
        scratch = np.empty(c.shape[0])
    for k, (a, b) in enumerate(zip(start[:-1].tolist(), start[1:].tolist(), strict=True)):
        if b > a:
            out[k] += np.cumsum(c[a:b], dtype=np.float64, out=scratch[a:b])[-1]
    return out

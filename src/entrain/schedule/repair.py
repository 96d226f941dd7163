"""The repair step of `place_units`: lower the largest excess over target by moving or
swapping single units, one bin at a time.

A step looks at one bin (the worst) and a few others, so its cost is the number of numpy calls
it makes, not the number of bins or units: with D=128 replicas a repair can run hundreds of
steps over 2048 bins. So the state a step needs (each bin's excess, its units, the spread
sample it offers) is kept across steps and only the bins a step touched are updated; a move
is found from per-microbatch minima instead of a (units x bins) matrix, and the swaps with
all candidate bins are scored in one array. It moves exactly the units the straightforward
version did (tests/test_scheduler_speedup.py keeps that version as a reference).
"""

from __future__ import annotations

import numpy as np


def repair(
    c: np.ndarray,
    earliest: np.ndarray,
    deadline: np.ndarray,
    D: int,
    q: np.ndarray,
    target: np.ndarray,
    steps: int,
    swap_bins: int = 4,
    sample: int = 48,
    good_enough: float = 5e-4,
    by_slot: bool = False,
    load: np.ndarray | None = None,
) -> np.ndarray:
    """Lower the largest excess over target by moving or swapping single units; returns `q`.

    Bins are numbered k*D + r (microbatch k, replica r); unit u may sit in the microbatches
    earliest[u]..deadline[u] (its window ends at its deadline), and sits in bin q[u].
    Each step takes the bin furthest over its target and does the best of
    - a move of one of its units to any bin the unit's window allows, and
    - a swap with one of the `swap_bins` bins furthest under target that can take a unit of
      the worst bin: swaps fix a bin that holds only large units, which no single move can;
    judged by the larger of the two bins' excess after it (ties: the first unit, then the
    first bin). A bin with many units offers a spread `sample` of them (its smallest and
    largest among them), which keeps each step cheap; it stops once the worst bin is within
    `good_enough` of a mean bin of its target, or when no move or swap lowers it.
    `by_slot` says the units come in microbatch order (q // D never falls), which lets a
    short repair find a bin's units without sorting them all. `load`, when given, is each
    bin's work (`np.bincount(q, weights=c)`), and is updated in place.
    """
    B = target.shape[0]
    M = B // D
    if load is None:
        load = np.bincount(q, weights=c, minlength=B)
    state = _State(c, earliest, deadline, q, target, load, sample, D if by_slot else 0)
    excess = state.excess
    per_slot = excess.reshape(M, D)  # a view: follows every update of `excess`
    upper = np.arange(M)[None, :] >= np.arange(M)[:, None]  # upper[e, d]: microbatches e..d
    stop = good_enough * max(float(target.mean()), 1e-300)
    for _ in range(steps):
        hi = int(excess.argmax())
        top = excess[hi]
        if top <= stop or len(state.members(hi)) == 0:
            break
        members, cm, em, dm, _ = state.sample_of(hi)
        best, action = _best_move(
            excess, per_slot, upper, hi, top, members, cm, em, dm, D, state.from_zero
        )
        lows = _lowest(excess, int(em.min()) * D, (int(dm.max()) + 1) * D, hi, swap_bins)
        if lows:
            best, action = _best_swap(
                excess, state, lows, hi, top, cm, em, dm, D, best, members, action
            )
        if best >= top - 1e-12 * abs(top):
            break
        u, v, dest = action
        state.relocate(u, hi, dest)
        if v is not None:
            state.relocate(v, dest, hi)
    return q


class _State:
    """Bins' loads and excess over target, each bin's units (lists in the order moves leave
    them, built when first needed) and its spread sample (cached until a move touches it).

    A bin's list is built before any move touches the bin, so from the units q puts in it
    then, in unit order. With `D` (units in microbatch order) the first few lists are read
    off their microbatch's stretch of q; once more are needed, all units are sorted by bin.
    The lists are arrays, replaced (never changed in place) when a move takes a unit out
    (the others keep their order) or puts one in (at the end), as a Python list's remove
    and append would: a video's bins hold a thousand units or more, and converting them
    to Python lists and back cost more than the rest of a step.
    """

    LAZY = 48  # lists read off a stretch of q before all units are sorted by bin

    def __init__(
        self,
        c: np.ndarray,
        earliest: np.ndarray,
        deadline: np.ndarray,
        q: np.ndarray,
        target: np.ndarray,
        load: np.ndarray,
        sample: int,
        D: int = 0,
    ):
        B = target.shape[0]
        self.c, self.earliest, self.deadline, self.q, self.k = c, earliest, deadline, q, sample
        self.target, self.load = target, load
        self.excess = load - target
        self.D = D
        self.from_zero = not earliest.any()  # every window starts at microbatch 0
        if D:  # q >= k*D is false, then true, along the units: a search finds microbatch k
            self.stretch = np.searchsorted(q, np.arange(0, B + 1, D)).tolist()
        self.order: np.ndarray | None = None  # all units by bin, once sorted
        self.start: np.ndarray | None = None  # where each bin's units start in `order`
        self.lists: dict[int, np.ndarray] = {}
        self.samples: dict[int, tuple] = {}
        # padding for samples (at most `sample` spread units plus the smallest and largest):
        # units of cost +inf whose window ends before microbatch 0
        self.pad = np.tile(np.array([[np.inf], [0.0], [-1.0]]), sample + 2)

    def members(self, b: int) -> np.ndarray:
        """Bin b's units (an array not to be changed)."""
        m = self.lists.get(b)
        if m is not None:
            return m
        if self.D and len(self.lists) < self.LAZY:
            lo, hi = self.stretch[b // self.D], self.stretch[b // self.D + 1]
            m = np.flatnonzero(self.q[lo:hi] == b) + lo
        else:
            if self.order is None:
                B = self.target.shape[0]
                key = self.q.astype(np.int16) if B < 2**15 else self.q  # a radix sort
                self.order = np.argsort(key, kind="stable")
                self.start = np.searchsorted(self.q[self.order], np.arange(B + 1))
            m = self.order[self.start[b] : self.start[b + 1]]
        self.lists[b] = m
        return m

    def sample_of(self, b: int) -> tuple:
        """(units, cost, earliest, deadline, the last three as rows of one array) of the
        units bin b offers: all of them, or at most about `k` evenly spaced plus its
        smallest and largest unit."""
        s = self.samples.get(b)
        if s is None:
            m = self.members(b)
            if m.size > self.k:
                cm = self.c[m]
                # the spread, the smallest and the largest unit: each once, in unit order
                # (np.unique, for a few dozen units, costs more than the rest of the step)
                m = np.sort(
                    np.concatenate([m[:: m.size // self.k + 1], m[[cm.argmin(), cm.argmax()]]])
                )
                m = m[np.concatenate([[True], m[1:] != m[:-1]])]
            cm, em, dm = self.c[m], self.earliest[m], self.deadline[m]
            s = self.samples[b] = (m, cm, em, dm, np.array([cm, em, dm], dtype=np.float64))
        return s

    def relocate(self, u: int, src: int, dst: int) -> None:
        cu = self.c[u]
        self.load[src] -= cu
        self.load[dst] += cu
        for b in (src, dst):
            self.excess[b] = self.load[b] - self.target[b]
        leave, enter = self.members(src), self.members(dst)  # (listed before q changes)
        self.q[u] = dst
        self.lists[src] = leave[leave != u]
        self.lists[dst] = np.append(enter, u)
        self.samples.pop(src, None)
        self.samples.pop(dst, None)


def _best_move(
    excess: np.ndarray,
    per_slot: np.ndarray,
    upper: np.ndarray,
    hi: int,
    top: float,
    members: np.ndarray,
    cm: np.ndarray,
    em: np.ndarray,
    dm: np.ndarray,
    D: int,
    from_zero: bool,
) -> tuple[float, tuple]:
    """Best move of a unit of bin `hi`: (the larger excess of the two bins after it, action).

    A unit of cost c moved to bin j leaves max(top - c, excess[j] + c), and rounding is
    monotone, so the best bin in a unit's window is one of least excess: the window's least
    excess comes from per-microbatch minima (the worst bin is never one, unless it is alone
    in its microbatch), and only the chosen unit's window is scanned for the first bin that
    attains it.
    """
    least = per_slot.min(axis=1)  # (M,)
    if D == 1:
        least[hi] = np.inf
    if from_zero:  # windows 0..d: the least excess up to each microbatch
        window = np.minimum.accumulate(least)[dm]
    else:
        window = np.minimum.accumulate(np.where(upper, least, np.inf), axis=1)[em, dm]
    val = np.maximum(top - cm, window + cm)
    i = int(val.argmin())
    best = val[i]
    if not best < np.inf:
        return best, (int(members[0]), None, 0)
    lo, end = int(em[i]) * D, (int(dm[i]) + 1) * D
    row = np.maximum(top - cm[i], excess[lo:end] + cm[i])
    if lo <= hi < end:
        row[hi - lo] = np.inf
    j = int(row.argmin())
    assert row[j] == best
    return best, (int(members[i]), None, lo + j)


def _lowest(excess: np.ndarray, lo: int, end: int, hi: int, k: int) -> list[int]:
    """The k bins of lo..end-1 but `hi` with the least excess, least first, exactly as
    `np.argsort` orders them; a partition finds them unless excess values tie."""
    n = end - lo - (lo <= hi < end)
    if n > k + 1:
        seg = excess[lo:end].copy()
        if lo <= hi < end:
            seg[hi - lo] = np.inf
        part = np.argpartition(seg, k)[: k + 1]
        # (k + 1 values: sorted as Python floats, faster than numpy calls on tiny arrays)
        least = sorted(zip(seg[part].tolist(), part.tolist()))
        if all(a[0] < b[0] for a, b in zip(least, least[1:])):  # distinct: a unique order
            return [j + lo for _, j in least[:k]]
    bins = np.arange(lo, end)
    reachable = bins[bins != hi]
    return reachable[np.argsort(excess[reachable])[:k]].tolist()


def _best_swap(
    excess: np.ndarray,
    state: _State,
    lows: list[int],
    hi: int,
    top: float,
    cm: np.ndarray,
    em: np.ndarray,
    dm: np.ndarray,
    D: int,
    best: float,
    members: np.ndarray,
    action: tuple,
) -> tuple[float, tuple]:
    """The best of `action` (worth `best`) and the swaps of a unit of `hi` with a smaller unit
    of a bin in `lows` (tried in that order; a later one must be strictly better).

    All bins are scored in one (bins, units of hi, units of the other bin) array. A unit that
    may not go to the other bin gets cost -inf, one that may not come to `hi` +inf: their
    swaps then score +inf. Swaps of a unit for one at least as large are scored too (the old
    code skipped them): they score at least `top`, so one of them is chosen only when nothing
    scores below `top`, and then the repair ends whatever was chosen.
    """
    samples = [state.sample_of(b) for b in lows]
    L, W = len(lows), max(s[0].size for s in samples)
    if W == 0:  # empty bins: nothing to swap with
        return best, action
    hk = hi // D
    pad = state.pad  # rows padded with units that fit nowhere
    other = np.concatenate([x for s in samples for x in (s[4], pad[:, : W - s[0].size])], axis=1)
    co = other[0]
    co[(other[1] > hk) | (other[2] < hk)] = np.inf  # may not come to hi
    lk = np.array([b // D for b in lows])[:, None]
    cl = np.where((em <= lk) & (dm >= lk), cm, -np.inf)  # (L, units of hi)
    delta = cl[:, :, None] - co.reshape(L, 1, W)  # (L, units of hi, W): work leaving hi
    sw = np.maximum(top - delta, excess[lows][:, None, None] + delta).reshape(L, -1)
    at = sw.argmin(axis=1)
    for r, (a, v) in enumerate(zip(at.tolist(), sw[np.arange(L), at].tolist(), strict=True)):
        if v < best:
            i, b = divmod(a, W)
            best, action = v, (int(members[i]), int(samples[r][0][b]), lows[r])
    return best, action

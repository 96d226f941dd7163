"""The columnar in-memory form of a workload: numpy arrays, no per-sample objects.

Every layer below (cost, schedule, sim) works on whole arrays at once, so a global batch of
thousands of samples costs microseconds per operation instead of a Python loop per sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Fields of one item, per modality, in manifest order.
MODALITY_FIELDS: dict[str, tuple[str, ...]] = {
    "image": ("height", "width"),
    "audio": ("seconds",),
    "video": ("frames", "height", "width"),
}
MODALITIES: tuple[str, ...] = tuple(MODALITY_FIELDS)


@dataclass(frozen=True, eq=False)
class ItemTable:
    """All items of one modality in a workload, sorted by owning sample."""

    sample: np.ndarray  # (I,) int64, index of the owning sample in the workload
    size: np.ndarray  # (I, k) float64, the modality's fields (see MODALITY_FIELDS)

    def __len__(self) -> int:
        return int(self.sample.shape[0])

    @staticmethod
    def empty(modality: str) -> ItemTable:
        k = len(MODALITY_FIELDS[modality])
        return ItemTable(np.zeros(0, np.int64), np.zeros((0, k), np.float64))


@dataclass(frozen=True, eq=False)
class Workload:
    """A sequence of samples in columnar form.

    `line` keeps each sample's line number in its manifest so later errors (a missing image
    file, a sample over the memory cap) can point the user at the exact line.
    """

    ids: list[str]
    text_tokens: np.ndarray  # (N,) int64
    items: dict[str, ItemTable] = field(default_factory=dict)
    line: np.ndarray | None = None  # (N,) int64, 1-based manifest line numbers

    def __post_init__(self) -> None:
        for m in MODALITIES:
            self.items.setdefault(m, ItemTable.empty(m))
        n = len(self.ids)
        assert self.text_tokens.shape == (n,), "text_tokens must have one entry per sample"
        if self.line is None:
            object.__setattr__(self, "line", np.arange(1, n + 1, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.ids)

    def item_count(self, modality: str) -> np.ndarray:
        """Items of `modality` per sample, shape (N,)."""
        return np.bincount(self.items[modality].sample, minlength=len(self)).astype(np.int64)

    def slice(self, start: int, stop: int) -> Workload:
        """Samples [start, stop) with their items, re-indexed from 0."""
        items = {}
        for m, t in self.items.items():
            lo, hi = np.searchsorted(t.sample, [start, stop])
            items[m] = ItemTable(t.sample[lo:hi] - start, t.size[lo:hi])
        return Workload(
            ids=self.ids[start:stop],
            text_tokens=self.text_tokens[start:stop],
            items=items,
            line=self.line[start:stop],
        )

    def take(self, order: np.ndarray) -> Workload:
        """Samples in the given order (a permutation or a subset), items following them."""
        order = np.asarray(order, dtype=np.int64)
        new_index = np.full(len(self), -1, dtype=np.int64)
        new_index[order] = np.arange(order.shape[0])
        items = {}
        for m, t in self.items.items():
            s = new_index[t.sample]
            keep = s >= 0
            s, size = s[keep], t.size[keep]
            perm = np.argsort(s, kind="stable")
            items[m] = ItemTable(s[perm], size[perm])
        return Workload(
            ids=[self.ids[i] for i in order],
            text_tokens=self.text_tokens[order],
            items=items,
            line=self.line[order],
        )

    @staticmethod
    def concat(parts: list[Workload]) -> Workload:
        """Join workloads end to end (used to build batches from streamed chunks)."""
        if not parts:
            return Workload(ids=[], text_tokens=np.zeros(0, np.int64))
        if len(parts) == 1:
            return parts[0]
        offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
        items = {}
        for m in MODALITIES:
            items[m] = ItemTable(
                np.concatenate([p.items[m].sample + o for p, o in zip(parts, offsets)]),
                np.concatenate([p.items[m].size for p in parts]),
            )
        return Workload(
            ids=[i for p in parts for i in p.ids],
            text_tokens=np.concatenate([p.text_tokens for p in parts]),
            items=items,
            line=np.concatenate([p.line for p in parts]),
        )

    def to_records(self) -> list[dict]:
        """Manifest dicts, one per sample (for writing traces and for tests)."""
        recs: list[dict] = [
            {"id": i, "text_tokens": int(t)} for i, t in zip(self.ids, self.text_tokens)
        ]
        for m, t in self.items.items():
            for s, row in zip(t.sample.tolist(), t.size.tolist()):
                value = row[0] if m == "audio" else [int(v) for v in row]
                recs[s].setdefault(m, []).append(value)
        return recs


def batch_indices(n: int, step: int, global_batch: int, seed: int, shuffle: bool) -> np.ndarray:
    """Sample indices of training step `step`: epochs of a seeded permutation of n samples,
    whole global batches only. The runtime trains on these and the replay simulator (which
    must not need torch) rebuilds them."""
    per_epoch = n // global_batch
    if per_epoch == 0:
        raise ValueError(f"the data has {n} samples, fewer than one global batch ({global_batch})")
    epoch, i = divmod(step, per_epoch)
    order = epoch_order(n, seed, epoch) if shuffle else np.arange(n)
    return order[i * global_batch : (i + 1) * global_batch]


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of n samples in one epoch. Training, the sampler, the replay and a
    seeded `entrain analyze`/`plan` all draw it from here, so a seed means the same batches
    everywhere."""
    return np.random.default_rng([seed, epoch]).permutation(n)

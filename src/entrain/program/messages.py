"""What a message of a step is, as both ends know it before it is sent: its key, sender,
receiver, ids and exact size; and the table of every message of a step, the one place they
are derived. No torch: every rank works out the table from the same assignment (its
transfers: program/transfers.py, their order: program/order.py), and the simulator times
the same rows (sim/simulator.py), so what is simulated is what is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from entrain.cost.batch import CostedBatch
from entrain.models.spec import ModelSpec
from entrain.schedule.assignment import Assignment
from entrain.schedule.copies import unit_copies

SLACK_ROWS = 4
"""Rows of headroom per tensor in a capacity (sizes the plan derives from a manifest may be
off by a rounding from what the files give)."""


@dataclass(frozen=True)
class Transfer:
    """One message of an iteration, as both ends know it before it is sent."""

    key: tuple
    """What it carries, e.g. ("act", replica, stage, microbatch); unique in the iteration."""
    src: int
    dst: int
    ids: tuple[int, ...]
    """The sample or unit ids it carries, one per tensor, in order."""
    size: int
    """Bytes on the wire, exactly (the sender pads up to it)."""
    what: str
    """Words for error messages."""


def capacity(meta: int, rows: Sequence[int], width: int, value_bytes: int = 4) -> int:
    """Bytes of a message carrying `meta` integers and one (rows[i] <= r, width) tensor per
    entry of `rows` of `value_bytes` a value, with SLACK_ROWS rows of headroom each."""
    header = 1 + 1 + meta + 1 + 3 * len(rows)
    values = sum(r + SLACK_ROWS for r in rows) * width
    return 8 * header + value_bytes * values


def capacities(n: np.ndarray, rows: np.ndarray, width: int, value_bytes: int) -> np.ndarray:
    """`capacity` of many messages at once: n[i] tensors of rows[i] rows in all."""
    n = np.asarray(n, dtype=np.int64)
    return (
        8 * (3 + 4 * n) + value_bytes * (np.asarray(rows, dtype=np.int64) + SLACK_ROWS * n) * width
    )


# ------------------------------------------------------------------ every message of a step

EMBED, EMBED_GRAD, ACT, ACT_GRAD = range(4)
KINDS = ("embed", "embed_grad", "act", "act_grad")
PASSES = ("F", "B")
"""The pass of the compute that makes or needs a message (column 0 of `make` and `need`)."""


@dataclass(frozen=True)
class Ranks:
    """Rank numbering of a layout: per replica, each encoder's copies in spec order, then the
    LLM stages (program/transfers.py's `roles`; the simulator numbers its devices, one
    tensor-parallel group each, the same way)."""

    dp: int
    encoders: tuple[str, ...]
    copies: tuple[int, ...]
    llm_stages: int

    @property
    def per_replica(self) -> int:
        return sum(self.copies) + self.llm_stages

    @property
    def world(self) -> int:
        return self.dp * self.per_replica

    def encoder(self, e: int, replica, copy=0):
        """Rank of copy `copy` of encoder number `e` (spec order) in `replica` (ints or
        arrays)."""
        return replica * self.per_replica + sum(self.copies[:e]) + copy

    def llm(self, replica, stage=0):
        return replica * self.per_replica + sum(self.copies) + stage


_COLUMNS = ("kind", "encoder", "replica", "k", "copy", "dest", "j", "stage", "src", "dst")


@dataclass(frozen=True)
class MessageTable:
    """Every message of one step, one row each, as numpy columns.

    Rows, in this order: per encoder (spec order), its embeddings, one message per (replica,
    microbatch, copy, LLM replica it feeds), sorted so; then, when it trains, their
    gradients, one per (encoder microbatch, copy, LLM replica and microbatch that used its
    units); then the LLM's activations of every stage boundary, one per (replica,
    microbatch), empty microbatches included (the next stage waits for them all the same),
    and their gradients. A message's ids are its units in unit order (embeddings), its units
    by sample then unit (their gradients, as the LLM microbatch holds them), or its samples
    in order (activations)."""

    ranks: Ranks
    kind: np.ndarray
    """KINDS index of each row."""
    encoder: np.ndarray
    """Spec index of the encoder whose units it carries (-1 for activations)."""
    replica: np.ndarray
    """The encoder's replica (embeddings and their gradients) or the LLM's (activations)."""
    k: np.ndarray
    """Encoder microbatch (-1 for activations)."""
    copy: np.ndarray
    dest: np.ndarray
    """The LLM replica the units belong to (== replica for activations)."""
    j: np.ndarray
    """LLM microbatch: the first that takes an embeddings message, the one whose backward
    returns a gradient, the one activations belong to."""
    stage: np.ndarray
    """Sending LLM stage of activations and their gradients (0 otherwise)."""
    src: np.ndarray
    dst: np.ndarray
    make: np.ndarray
    """(n, 2): pass (PASSES index) and microbatch of the sender's compute that makes it."""
    need: np.ndarray
    """(n, 2): pass and microbatch of the receiver's compute that needs it first."""
    nbytes: np.ndarray
    """Exact bytes on the wire (`capacity`)."""
    ids_flat: np.ndarray
    ids_start: np.ndarray
    """Row i carries ids_flat[ids_start[i]:ids_start[i + 1]] (unit or sample indices)."""

    def __len__(self) -> int:
        return len(self.kind)

    def ids(self, i: int) -> tuple[int, ...]:
        return tuple(self.ids_flat[self.ids_start[i] : self.ids_start[i + 1]].tolist())

    def key(self, i: int) -> tuple:
        """Row i's key, as program/transfers.py's *_key functions build it."""
        kind, r, j = int(self.kind[i]), int(self.replica[i]), int(self.j[i])
        if kind >= ACT:
            return (KINDS[kind], r, int(self.stage[i]), j)
        e, k, d, c = (
            self.ranks.encoders[self.encoder[i]],
            int(self.k[i]),
            int(self.dest[i]),
            int(self.copy[i]),
        )
        return ("embed", e, r, k, d, c) if kind == EMBED else ("embed_grad", e, r, k, d, j, c)

    def what(self, i: int) -> str:
        """Row i in words, for error messages."""
        kind, r, j = int(self.kind[i]), int(self.replica[i]), int(self.j[i])
        if kind == ACT:
            return f"activations of LLM microbatch {j} from stage {int(self.stage[i])}"
        if kind == ACT_GRAD:
            return f"activation gradients of LLM microbatch {j} from stage {int(self.stage[i])}"
        e, k, c = self.ranks.encoders[self.encoder[i]], int(self.k[i]), int(self.copy[i])
        if kind == EMBED:
            return f"{e} embeddings of encoder microbatch {k} (replica {r}, copy {c})"
        return (
            f"gradients of {e} microbatch {k} (replica {r}, copy {c}) from LLM microbatch {j} "
            f"(replica {int(self.dest[i])})"
        )

    def transfer(self, i: int) -> Transfer:
        return Transfer(
            self.key(i),
            int(self.src[i]),
            int(self.dst[i]),
            self.ids(i),
            int(self.nbytes[i]),
            self.what(i),
        )

    def transfers(self) -> list[Transfer]:
        return [self.transfer(i) for i in range(len(self))]


def _runs(key: np.ndarray, *ties: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices sorted by `key`, then by `ties` (the first most significant), then by index;
    where each run of equal keys starts in that order, and each run's key."""
    order = np.lexsort((np.arange(len(key)), *reversed(ties), key))
    sorted_key = key[order]
    starts = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    return order, starts, sorted_key[starts]


def message_table(
    batch: CostedBatch,
    asg: Assignment,
    spec: ModelSpec,
    llm_stages: int,
    copies: dict[str, int] | None = None,
    value_bytes: int = 4,
    width: int | None = None,
) -> MessageTable:
    """Every message of the step `asg` makes of `batch` (see MessageTable).

    `copies`: encoder copies per replica (ParallelPlan.encoder_dp), their units split by the
    policy's rule (schedule/copies.py). `value_bytes`: of a value on the wire (the run's wire
    dtype). `width`: values a row of every message (an emulated run's small payloads);
    default the real ones: the LLM's hidden size, or a frozen encoder's own, whose projector
    runs on the LLM side."""
    copies = copies or {}
    D, M, P = asg.dp, asg.microbatches, llm_stages
    names = tuple(e.name for e in spec.encoders)
    ranks = Ranks(D, names, tuple(copies.get(n, 1) for n in names), P)
    parts: list[dict] = []  # columns of a block of rows (scalars broadcast)
    ids: list[tuple[np.ndarray, np.ndarray]] = []  # per block: ids in row order, count per row

    for ei, enc in enumerate(spec.encoders):
        t = batch.units[enc.name]
        if len(t) == 0:
            continue
        C = ranks.copies[ei]
        ur = asg.unit_replica[enc.name].astype(np.int64)
        uk = asg.unit_mb[enc.name].astype(np.int64)
        uc = unit_copies(batch, asg, enc.name, C).astype(np.int64)
        smp = t.sample.astype(np.int64)
        d = asg.sample_replica[smp].astype(np.int64)
        j = asg.sample_mb[smp].astype(np.int64)
        rows = (t.tokens if enc.frozen else t.llm_tokens).astype(np.int64)
        w = width or (enc.encoder.hidden_size if enc.frozen else spec.llm.hidden_size)
        key = ((ur * M + uk) * C + uc) * D + d  # (replica, microbatch, copy, LLM replica)
        for grad in (False, True) if not enc.frozen else (False,):
            # embeddings: units in unit order; their gradients: one message per LLM
            # microbatch too, units by sample then unit (as the microbatch holds them)
            order, starts, keys = _runs(key * M + j, smp) if grad else _runs(key)
            n = np.diff(np.r_[starts, len(key)])
            rest, jj = np.divmod(keys, M) if grad else (keys, None)
            rest, dd = np.divmod(rest, D)
            rest, cc = np.divmod(rest, C)
            rr, kk = np.divmod(rest, M)
            if not grad:  # taken by the first LLM microbatch of dd that needs it
                jj = np.minimum.reduceat(j[order], starts)
            ends = (ranks.encoder(ei, rr, cc), ranks.llm(dd))
            src, dst = ends[::-1] if grad else ends
            ops = ((1, jj), (1, kk)) if grad else ((0, kk), (0, jj))
            nbytes = capacities(n, np.add.reduceat(rows[order], starts), w, value_bytes)
            kind = EMBED_GRAD if grad else EMBED
            parts.append(_block(kind, ei, rr, kk, cc, dd, jj, 0, src, dst, *ops, nbytes))
            ids.append((order, n))

    bins = asg.llm_bin().astype(np.int64)
    order = np.argsort(bins, kind="stable")  # each microbatch's samples, in sample order
    n = np.bincount(bins, minlength=D * M)
    rows = np.bincount(bins, weights=batch.llm_tokens, minlength=D * M).round().astype(np.int64)
    nbytes = capacities(n, rows, width or spec.llm.hidden_size, value_bytes)
    rr, jj = np.divmod(np.arange(D * M), M)
    for kind, src, dst, p in [(ACT, s, s + 1, 0) for s in range(P - 1)] + [
        (ACT_GRAD, s, s - 1, 1) for s in range(1, P)
    ]:  # a message per microbatch and stage boundary, both ways
        a, b = ranks.llm(rr, src), ranks.llm(rr, dst)
        parts.append(_block(kind, -1, rr, -1, 0, rr, jj, src, a, b, (p, jj), (p, jj), nbytes))
        ids.append((order, n))
    return _table(ranks, parts, ids)


def _block(*columns) -> dict:
    """A block of rows: _COLUMNS, then make, need and nbytes (scalars broadcast)."""
    return dict(zip((*_COLUMNS, "make", "need", "nbytes"), columns))


def _table(
    ranks: Ranks, parts: list[dict], ids: list[tuple[np.ndarray, np.ndarray]]
) -> MessageTable:
    """The blocks of rows as one table."""
    sizes = [len(p["nbytes"]) for p in parts]

    def column(name: str) -> np.ndarray:
        if not parts:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate(
            [
                np.broadcast_to(np.asarray(p[name], dtype=np.int64), (m,))
                for p, m in zip(parts, sizes)
            ]
        )

    def pair(name: str) -> np.ndarray:
        blocks = [
            np.stack([np.broadcast_to(np.asarray(x, dtype=np.int64), (m,)) for x in p[name]], 1)
            for p, m in zip(parts, sizes)
        ]
        return np.concatenate(blocks) if blocks else np.zeros((0, 2), dtype=np.int64)

    counts = np.concatenate([n for _, n in ids]) if ids else np.zeros(0, np.int64)
    return MessageTable(
        ranks=ranks,
        **{c: column(c) for c in _COLUMNS},
        make=pair("make"),
        need=pair("need"),
        nbytes=column("nbytes"),
        ids_flat=np.concatenate([o for o, _ in ids]) if ids else np.zeros(0, np.int64),
        ids_start=np.r_[0, np.cumsum(counts)].astype(np.int64),
    )

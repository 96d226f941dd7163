"""A sample as the LLM sees it: token ids with each item's rows where its placeholder stands,
the labels, and the rotary positions. No torch: the trainer, the reference and the manifest
tools build samples with the same function, so the token counts the scheduler plans with
are the ones the model runs.

The text may mark where items stand with `<image>`, `<video>` and `<audio>` (one marker per
item, in order). A modality without any marker has its items put in front of the text, as
LLaVA does. Each marker becomes the codec's marker (Qwen2-VL:
`<|vision_start|><|image_pad|><|vision_end|>`), the whole text is tokenized once, and each
pad token is expanded to the item's LLM rows: what the model's processor does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from entrain.data.codec import MODALITIES_IN_TEXT, USER_MARKERS, TextCodec

IGNORE = -100
"""Label of a position that has no loss (transformers' ignore_index)."""

ROPE_KINDS = ("1d", "mrope")


class LayoutError(ValueError):
    """A sample whose text and items disagree; names the sample."""


@dataclass(frozen=True)
class Span:
    """Where one item's embedding rows stand in its sample's sequence."""

    modality: str
    item: int
    """Index among the sample's items of this modality."""
    start: int
    rows: int
    grid: tuple[int, int, int] | None = None
    """Vision items: the LLM-side grid (temporal patches, rows, columns) after merging."""


@dataclass(frozen=True, eq=False)
class SampleTokens:
    input_ids: np.ndarray
    """(L,) int64, pads where items stand."""
    labels: np.ndarray
    """(L,) int64, IGNORE where no loss is taken."""
    spans: tuple[Span, ...]
    """Items in sequence order."""
    positions: np.ndarray
    """(1, L) positions, or (3, L) temporal/height/width positions for M-RoPE."""

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def text_tokens(self) -> int:
        """Tokens that are not an item's rows: the manifest's `text_tokens`."""
        return self.length - sum(s.rows for s in self.spans)

    @property
    def targets(self) -> int:
        """Next-token predictions that count in the loss."""
        return int((self.labels[1:] != IGNORE).sum())


@dataclass(frozen=True)
class Item:
    """One item of a sample as the sequence needs it."""

    rows: int
    """LLM tokens the item's embeddings take."""
    grid: tuple[int, int, int] | None = None
    time_interval: float = 1.0
    """M-RoPE: temporal positions per temporal patch (Qwen2.5-VL video), 1 otherwise."""


def render(text: str, items: dict[str, Sequence], codec: TextCodec, sample: str) -> str:
    """The text with each user marker replaced by the codec's marker; items of a modality the
    text never marks go in front."""
    front = []
    for m in MODALITIES_IN_TEXT:
        n = len(items.get(m, ()))
        marks = text.count(USER_MARKERS[m])
        if (n or marks) and m not in codec.markers:
            raise LayoutError(
                f"sample {sample!r}: has {max(n, marks)} {m} item(s) or marker(s) but the "
                f"tokenizer ({codec.name}) has no placeholder token for {m}"
            )
        if marks == 0:
            front.append(codec.markers.get(m, "") * n)
        elif marks != n:
            raise LayoutError(
                f"sample {sample!r}: the text has {marks} {USER_MARKERS[m]} marker(s) but the "
                f"sample has {n} {m} item(s)"
            )
        else:
            text = text.replace(USER_MARKERS[m], codec.markers[m])
    return "".join(front) + text


def count_text_tokens(sample: str, text: str, counts: dict[str, int], codec: TextCodec) -> int:
    """The manifest's `text_tokens` of a sample: its tokens that are not an item's rows (they
    do not depend on the items' sizes)."""
    ids = codec.encode(render(text, {m: [None] * n for m, n in counts.items()}, codec, sample))
    pads = set(codec.pad_ids.values())
    return sum(1 for i in ids if i not in pads)


def build_tokens(
    sample: str,
    text: str,
    items: dict[str, Sequence[Item]],
    codec: TextCodec,
    rope: str = "1d",
) -> SampleTokens:
    """Ids, labels and positions of one sample. Every text token is a target; issue-level
    masking (assistant turns only) is the caller's, through `labels`."""
    ids = codec.encode(render(text, items, codec, sample))
    return expand(sample, ids, list(ids), items, codec, rope)


def expand(
    sample: str,
    ids: list[int],
    labels: list[int],
    items: dict[str, Sequence[Item]],
    codec: TextCodec,
    rope: str = "1d",
) -> SampleTokens:
    """Expand each pad token of `ids` to its item's rows (labels IGNORE there)."""
    by_pad = {pad: m for m, pad in codec.pad_ids.items()}
    used = dict.fromkeys(items, 0)
    out_ids: list[np.ndarray] = []
    out_labels: list[np.ndarray] = []
    spans: list[Span] = []
    length = 0
    run_start = 0
    for i, tok in enumerate(ids):
        m = by_pad.get(tok)
        if m is None:
            continue
        k = used.get(m, 0)
        if k >= len(items.get(m, ())):
            raise LayoutError(
                f"sample {sample!r}: the text holds more {m} placeholders than the sample's "
                f"{len(items.get(m, ()))} {m} item(s)"
            )
        out_ids.append(np.asarray(ids[run_start:i], np.int64))
        out_labels.append(np.asarray(labels[run_start:i], np.int64))
        length += i - run_start
        item = items[m][k]
        out_ids.append(np.full(item.rows, tok, np.int64))
        out_labels.append(np.full(item.rows, IGNORE, np.int64))
        spans.append(Span(m, k, length, item.rows, item.grid))
        length += item.rows
        used[m] = k + 1
        run_start = i + 1
    out_ids.append(np.asarray(ids[run_start:], np.int64))
    out_labels.append(np.asarray(labels[run_start:], np.int64))
    for m, seq in items.items():
        if used.get(m, 0) != len(seq):
            raise LayoutError(
                f"sample {sample!r}: {len(seq)} {m} item(s) but {used.get(m, 0)} placeholder(s) "
                "in its text"
            )
    input_ids = np.concatenate(out_ids) if out_ids else np.zeros(0, np.int64)
    spans_t = tuple(spans)
    times = [items[s.modality][s.item].time_interval for s in spans_t]
    return SampleTokens(
        input_ids=input_ids,
        labels=np.concatenate(out_labels),
        spans=spans_t,
        positions=positions(len(input_ids), spans_t, rope, times),
    )


def positions(
    length: int, spans: Sequence[Span], rope: str, time_intervals: Sequence[float] = ()
) -> np.ndarray:
    """Rotary positions. "1d": 0..L-1. "mrope" (Qwen2-VL): text advances all three axes by
    one per token; a vision item takes its (temporal, row, column) grid offset by the current
    position, and the text after it continues from the current position plus the grid's
    larger side, as transformers' `get_rope_index` does. Audio counts as text."""
    if rope == "1d":
        return np.arange(length, dtype=np.int64)[None]
    if rope != "mrope":
        raise ValueError(f"unknown rope kind {rope!r}; known: {ROPE_KINDS}")
    out = np.empty((3, length), np.int64)
    cur, row = 0, 0
    for k, s in enumerate(spans):
        if s.grid is None:  # audio: positions as if it were text
            continue
        n = s.start - row
        out[:, row : s.start] = cur + np.arange(n)
        cur += n
        t, h, w = s.grid
        if t * h * w != s.rows:
            raise LayoutError(f"a {s.modality} item of grid {s.grid} cannot take {s.rows} rows")
        interval = time_intervals[k] if k < len(time_intervals) else 1.0
        tt, hh, ww = np.meshgrid(
            (np.arange(t) * interval).astype(np.int64), np.arange(h), np.arange(w), indexing="ij"
        )
        out[:, s.start : s.start + s.rows] = cur + np.stack([tt, hh, ww]).reshape(3, -1)
        cur += max(h, w)
        row = s.start + s.rows
    out[:, row:] = cur + np.arange(length - row)
    return out


def workload_items(workload, spec, video_interval=None) -> list[dict[str, list[Item]]]:
    """Per sample, its items with the rows and grids the model gives them (the cost model's
    token rules: one function for the scheduler's counts and the sequence's rows).
    `video_interval(sample)`: M-RoPE temporal positions per temporal patch of that sample's
    videos (Qwen2.5-VL spaces them by time; 1 when None)."""
    from entrain.cost.tokens import audio_units, vision_grids
    from entrain.models.spec import VisionSpec

    out: list[dict[str, list[Item]]] = [{} for _ in range(len(workload))]
    for enc in spec.encoders:
        for m in enc.modalities:
            table = workload.items[m]
            if not len(table):
                continue
            if isinstance(enc, VisionSpec):
                g = vision_grids(enc, m, table.size)
                g[:, 1:] //= enc.merge_size
                made = [
                    Item(
                        int(t * h * w),
                        (int(t), int(h), int(w)),
                        video_interval(s) if (m == "video" and video_interval) else 1.0,
                    )
                    for (t, h, w), s in zip(g.tolist(), table.sample.tolist())
                ]
            else:
                n_units, _, llm = audio_units(enc, table.size[:, 0])
                per_item = np.add.reduceat(llm, np.cumsum(n_units) - n_units)
                made = [Item(int(r)) for r in per_item.tolist()]
            for s, item in zip(table.sample.tolist(), made):
                out[s].setdefault(m, []).append(item)
    return out

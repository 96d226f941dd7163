"""Reading and validating JSON Lines manifests (docs/design.md section 4), streaming.

A manifest can hold tens of millions of samples, so it is read in chunks: each chunk becomes a
columnar `Workload` and the per-line dicts are dropped at once. The only state that grows with
the file is one 64-bit hash per id, kept to catch duplicate ids (about 70 bytes a sample).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from entrain.workload.columnar import MODALITY_FIELDS, ItemTable, Workload, epoch_order


class ManifestError(ValueError):
    """A manifest line that breaks the format; the message names file, line and field."""

    def __init__(self, path: str | os.PathLike, line: int | None, field: str | None, msg: str):
        self.path, self.line, self.field, self.msg = str(path), line, field, msg
        where = f"{self.path}:{line}" if line is not None else self.path
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {msg}")


class ShortManifestError(ManifestError):
    """A manifest with fewer samples than one global batch. `plan`, `simulate` and
    `analyze` refuse it: they would report the global batch asked for while working on a
    smaller one, with fewer microbatches' worth of samples per replica than the run has."""

    def __init__(self, path: str | os.PathLike, samples: int, global_batch: int, why: str = ""):
        self.samples, self.global_batch = samples, global_batch
        super().__init__(
            path,
            None,
            None,
            f"{samples} sample(s), fewer than one global batch of {global_batch}{why}; "
            f"pass --global-batch {samples} or less",
        )


# Sizes are held as float64 and counts as int64: beyond 2**53 neither is exact, and no real
# image side, token count or duration comes near it.
_LIMIT = 2**53
# JSON's own whitespace; other characters str.strip() removes (form feed, U+3000, ...) make
# a line that is not blank, and not valid either.
_JSON_SPACE = b" \t\r\n"


def _is_int(v: object) -> bool:
    # JSON true/false parse as bool, a subclass of int; they are never a valid count.
    return isinstance(v, int) and not isinstance(v, bool) and -_LIMIT < v < _LIMIT


def _is_number(v: object) -> bool:
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v) and abs(v) < _LIMIT)


def _show(v: object, width: int = 40) -> str:
    """A JSON value for an error message, shortened so a huge one does not flood the line."""
    text = json.dumps(v)
    return text if len(text) <= width else text[: width - 3] + "..."


def _check_item(modality: str, value: object) -> str | None:
    """Why one item is invalid, or None when it is fine."""
    fields = MODALITY_FIELDS[modality]
    if modality == "audio":
        if not _is_number(value):
            return f"expected a duration in seconds (a finite number), got {_show(value)}"
        if value <= 0:
            return f"duration must be > 0 seconds, got {value}"
        return None
    if not isinstance(value, list) or len(value) != len(fields):
        return f"expected [{', '.join(fields)}], got {json.dumps(value)}"
    for name, v in zip(fields, value):
        if not _is_int(v):
            return f"{name} must be an integer below 2**53, got {_show(v)}"
        if v <= 0:
            return f"{name} must be a positive integer, got {v}"
    return None


@dataclass
class _Chunk:
    """Column builders for one chunk of lines."""

    ids: list[str]
    text: list[int]
    lines: list[int]
    item_sample: dict[str, list[int]]
    item_size: dict[str, list]

    @staticmethod
    def new() -> _Chunk:
        return _Chunk(
            [], [], [], {m: [] for m in MODALITY_FIELDS}, {m: [] for m in MODALITY_FIELDS}
        )

    def to_workload(self) -> Workload:
        items = {}
        for m, fields in MODALITY_FIELDS.items():
            size = np.asarray(self.item_size[m], dtype=np.float64).reshape(-1, len(fields))
            items[m] = ItemTable(np.asarray(self.item_sample[m], dtype=np.int64), size)
        return Workload(
            ids=self.ids,
            text_tokens=np.asarray(self.text, dtype=np.int64),
            items=items,
            line=np.asarray(self.lines, dtype=np.int64),
        )


def parse_record(path: str | os.PathLike, lineno: int, text: str) -> dict:
    """Parse and validate one manifest line; raises ManifestError naming what is wrong."""
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(
            path, lineno, None, f"not valid JSON ({e.msg} at column {e.colno})"
        ) from None
    except (ValueError, RecursionError) as e:  # Python's limits: huge integers, deep nesting
        raise ManifestError(path, lineno, None, f"not a usable JSON object ({e})") from None
    if not isinstance(rec, dict):
        raise ManifestError(path, lineno, None, f"expected a JSON object, got {type(rec).__name__}")
    if "id" not in rec:
        raise ManifestError(path, lineno, "id", "missing (every sample needs a unique string id)")
    sid = rec["id"]
    if not isinstance(sid, str) or not sid:
        raise ManifestError(
            path, lineno, "id", f"expected a non-empty string, got {json.dumps(sid)}"
        )
    if "text_tokens" not in rec:
        raise ManifestError(path, lineno, "text_tokens", "missing (an integer >= 0)")
    tt = rec["text_tokens"]
    if not _is_int(tt) or tt < 0:
        raise ManifestError(
            path, lineno, "text_tokens", f"expected an integer >= 0, got {json.dumps(tt)}"
        )
    for m in MODALITY_FIELDS:
        v = rec.get(m)
        if v is None:  # a missing key or null both mean "no item of this modality"
            continue
        if not isinstance(v, list):
            raise ManifestError(path, lineno, m, f"expected a list of items, got {_show(v)}")
        for k, item in enumerate(v):
            why = _check_item(m, item)
            if why:
                raise ManifestError(path, lineno, f"{m}[{k}]", why)
    return rec


class ManifestReader:
    """Streams a manifest as columnar chunks, validating every line on the way.

    Duplicate ids are caught as soon as the second one is read. Only a 64-bit hash of each id
    is remembered; a hash match is confirmed against the earlier line before it is reported,
    so a hash collision never produces a false error.
    """

    def __init__(self, path: str | os.PathLike, chunk_size: int = 65536):
        self.path = Path(path)
        self.chunk_size = chunk_size
        self.samples_read = 0
        self._seen: set[int] = set()

    def _first_line_with_id(self, sid: str, before: int) -> int | None:
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if lineno >= before:
                    return None
                if raw.strip(_JSON_SPACE) and json.loads(raw).get("id") == sid:
                    return lineno
        return None

    def __iter__(self) -> Iterator[Workload]:
        if not self.path.exists():
            raise ManifestError(self.path, None, None, "file not found")
        if self.path.is_dir():
            inside = self.path / "manifest.jsonl"
            hint = f" (did you mean {inside}?)" if inside.is_file() else ""
            raise ManifestError(self.path, None, None, f"a folder, not a manifest file{hint}")
        chunk = _Chunk.new()
        # Binary lines, decoded one by one: a text-mode reader decodes ahead in blocks and
        # would blame a bad byte on the wrong line.
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip(_JSON_SPACE):
                    continue  # a blank line holds no sample, so nothing is dropped
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ManifestError(
                        self.path, lineno, None, f"not UTF-8 text ({e.reason})"
                    ) from None
                rec = parse_record(self.path, lineno, text)
                self._add(chunk, lineno, rec)
                if len(chunk.ids) >= self.chunk_size:
                    yield chunk.to_workload()
                    chunk = _Chunk.new()
        if chunk.ids:
            yield chunk.to_workload()
        if self.samples_read == 0:
            raise ManifestError(self.path, None, None, "the manifest holds no samples (empty file)")

    def _add(self, chunk: _Chunk, lineno: int, rec: dict) -> None:
        sid = rec["id"]
        h = hash(sid)
        if h in self._seen:
            first = self._first_line_with_id(sid, lineno)
            if first is not None:
                raise ManifestError(
                    self.path,
                    lineno,
                    "id",
                    f"duplicate id {json.dumps(sid)} (first seen on line {first})",
                )
        self._seen.add(h)
        s = len(chunk.ids)
        chunk.ids.append(sid)
        chunk.text.append(rec["text_tokens"])
        chunk.lines.append(lineno)
        for m in MODALITY_FIELDS:
            for item in rec.get(m) or ():
                chunk.item_sample[m].append(s)
                chunk.item_size[m].append(item)
        self.samples_read += 1


def read_manifest(path: str | os.PathLike) -> Workload:
    """The whole manifest in memory (fine up to a few million samples)."""
    return Workload.concat(list(ManifestReader(path)))


def iter_batches(
    path: str | os.PathLike,
    batch_size: int,
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[Workload]:
    """Global batches of exactly `batch_size` samples in manifest order.

    The tail that does not fill a batch is yielded last, so the caller decides (and reports)
    whether to use it; nothing is dropped silently here.
    """
    if batch_size <= 0:
        raise ValueError(f"batch size must be positive, got {batch_size}")
    pending: list[Workload] = []
    held = 0
    for chunk in ManifestReader(path, chunk_size=max(4096, min(batch_size, 65536))):
        pending.append(chunk)
        held += len(chunk)
        if on_progress:
            on_progress(len(chunk))
        if held < batch_size:
            continue
        buf = Workload.concat(pending)
        start = 0
        while len(buf) - start >= batch_size:
            yield buf.slice(start, start + batch_size)
            start += batch_size
        rest = buf.slice(start, len(buf))
        pending, held = ([rest], len(rest)) if len(rest) else ([], 0)
    if held:
        yield Workload.concat(pending)


def write_manifest(
    path: str | os.PathLike,
    workload: Workload | Iterable[Workload],
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Write one workload or a stream of chunks as a manifest; returns samples written.

    Written to a temporary name and renamed at the end, so a reader never sees half a file;
    the temporary file goes too when the writing stops (Ctrl-C, a full disk, a bad chunk).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # `-o out/omni/manifest.jsonl` on a fresh tree
    tmp = path.with_name(path.name + ".tmp")
    chunks = [workload] if isinstance(workload, Workload) else workload
    written = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for chunk in chunks:
                f.writelines(
                    json.dumps(r, separators=(",", ":")) + "\n" for r in chunk.to_records()
                )
                written += len(chunk)
                if on_progress:
                    on_progress(len(chunk))
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: a half-written trace is of no use
        tmp.unlink(missing_ok=True)
        raise
    return written


def global_batches(
    manifest: str | os.PathLike,
    global_batch: int,
    iterations: int = 0,
    seed: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[Workload]:
    """The first `iterations` global batches of a manifest (all when 0), in manifest order or
    shuffled by `seed` as a training epoch would; the last one may be a tail smaller than a
    global batch, which the caller decides about."""
    if seed is None:
        source = iter_batches(manifest, global_batch, on_progress)
    else:
        w = read_manifest(manifest)
        if on_progress:
            on_progress(len(w))
        w = w.take(epoch_order(len(w), seed, 0))  # the first epoch of a run with this seed
        source = (w.slice(s, min(s + global_batch, len(w))) for s in range(0, len(w), global_batch))
    for used, batch in enumerate(source, 1):
        yield batch
        if iterations and used >= iterations:
            return

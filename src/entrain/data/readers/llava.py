"""LLaVA / ShareGPT conversation JSON: a list of
`{"id", "image": "path" | ["path", ...], "conversations": [{"from", "value"}, ...]}`, with
`"video"` paths (video files or folders of frames) as LLaVA-Video writes them; LLaMA-Factory's
`"images"` / `"videos"` are read alike.

A `.json` file is loaded whole (the stdlib has no streaming JSON parser; LLaVA-665k's 1 GB
takes a few GB of memory), then converted record by record. A `.jsonl` file, one record a
line, is streamed. Image paths are relative to `image_root` (default: the file's folder).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from entrain.data.readers.common import (
    ItemRef,
    RawSample,
    ReaderError,
    ReaderOptions,
    as_id,
    conversation_of,
    conversation_text,
    record_label,
)

USES = frozenset({"image_root", "video_fps"})
ABOUT = "LLaVA/ShareGPT conversation JSON (a list of records) or JSON Lines"


def read(path: Path, options: ReaderOptions, notes: list[str]) -> Iterator[RawSample | ReaderError]:
    if not path.is_file():
        raise ReaderError(path, None, None, "no such file (expected a .json or .jsonl file)")
    root = Path(options.image_root) if options.image_root else path.parent
    if path.suffix == ".jsonl":
        yield from _read_lines(path, root)
        return
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ReaderError(
            path, None, None, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
        ) from None
    except UnicodeDecodeError as e:
        raise ReaderError(path, None, None, f"not UTF-8 text ({e.reason})") from None
    if not isinstance(data, list):
        raise ReaderError(path, None, None, f"expected a JSON list of records, got {_kind(data)}")
    for i in range(len(data)):
        obj, data[i] = data[i], None  # let each record's memory go once it is converted
        yield _sample(path, "record", i, obj, root)


def _read_lines(path: Path, root: Path) -> Iterator[RawSample | ReaderError]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield ReaderError(path, f"line {lineno}", None, f"not valid JSON ({e})")
                continue
            yield _sample(path, "line", lineno, obj, root)


def _sample(path: Path, kind: str, index: int, obj: object, root: Path) -> RawSample | ReaderError:
    """One record parsed; its id defaults to its index (JSON) or line number (JSON Lines)."""
    if not isinstance(obj, dict):
        return ReaderError(path, f"{kind} {index}", None, f"expected an object, got {_kind(obj)}")
    raw_id = obj.get("id")
    sid = str(index) if raw_id is None else as_id(raw_id)
    where = record_label(kind, index, sid)
    if sid is None:
        return ReaderError(path, where, "id", f"expected a string or integer, got {_kind(raw_id)}")
    paths: dict[str, list[str]] = {}
    for modality in ("image", "video"):
        key = modality if modality in obj else modality + "s"  # LLaMA-Factory: "images"
        value = obj.get(key)
        value = [] if value is None else [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(p, str) and p for p in value):
            return ReaderError(path, where, key, "expected a path or a list of paths")
        paths[modality] = value
    turns = obj.get("conversations")
    if not isinstance(turns, list):
        return ReaderError(path, where, "conversations", f"expected a list, got {_kind(turns)}")
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return ReaderError(
                path, where, f"conversations[{k}]", 'expected {"from": ..., "value": "text"}'
            )
    sample = RawSample(
        source=str(path),
        record=where,
        id=sid,
        text=conversation_text([t["value"] for t in turns]),
        image=[ItemRef(field=f"image {p!r}", path=root / p) for p in paths["image"]],
        video=[ItemRef(field=f"video {p!r}", path=root / p) for p in paths["video"]],
    )
    try:
        sample.messages = conversation_of(sample, turns)
    except ReaderError as e:
        return e
    return sample


def _kind(v: object) -> str:
    return "nothing" if v is None else type(v).__name__

"""WebDataset tar shards: a .tar file, a folder of them, or a glob ("shards/*.tar").

Members are grouped into samples by key, the member name up to the first dot of its base
name (`a/b/000123.left.jpg` has key `a/b/000123`, extension `left.jpg`); a sample's members
sit next to each other in the shard, so shards are read as streams (gzip-compressed ones
too) with one sample in memory at a time. What the last part of the extension says:

- jpg, jpeg, png, webp: an image (several per sample are kept, in extension order);
- wav (and flac, mp3, ogg when soundfile is installed): an audio clip;
- txt: the text; json: an object whose "text" (or "caption") is the text, if no txt.

Other members are counted in the summary's notes and not read. The key is the sample id.
"""

from __future__ import annotations

import glob
import json
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from entrain.data.readers.common import ItemRef, RawSample, ReaderError, ReaderOptions

USES: frozenset[str] = frozenset()
ABOUT = "WebDataset tar shards (a .tar file, a folder of shards, or a glob)"
IMAGE_EXT = frozenset({"jpg", "jpeg", "png", "webp"})
AUDIO_EXT = frozenset({"wav", "flac", "mp3", "ogg"})
TEXT_EXT = frozenset({"txt", "json"})
_SHARD_GLOBS = ("*.tar", "*.tar.gz", "*.tgz")


def read(path: Path, options: ReaderOptions, notes: list[str]) -> Iterator[RawSample | ReaderError]:
    ignored: Counter[str] = Counter()
    for shard in _shards(path):
        yield from _read_shard(shard, ignored)
    if ignored:
        kinds = ", ".join(f"{n} .{ext}" for ext, n in sorted(ignored.items()))
        notes.append(f"tar members of other types were not read: {kinds}")


def _shards(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        shards = sorted({p for g in _SHARD_GLOBS for p in path.glob(g)})
        if not shards:
            raise ReaderError(path, None, None, "no .tar shards in this folder")
        return shards
    if glob.has_magic(str(path)):
        shards = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).is_file())
        if not shards:
            raise ReaderError(path, None, None, "no file matches this pattern")
        return shards
    raise ReaderError(path, None, None, "no such file or folder")


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, as WebDataset splits it."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext if dot else ""


def _last(ext: str) -> str:
    """What decides a member's type: the last part of its extension ("left.JPG" -> "jpg")."""
    return ext.rpartition(".")[2].lower()


def _read_shard(shard: Path, ignored: Counter) -> Iterator[RawSample | ReaderError]:
    key, members = None, {}  # the sample being gathered: extension -> (member name, bytes)
    try:
        with tarfile.open(shard, "r|*") as tar:  # a stream: members in order, no index
            for m in tar:
                if not m.isfile():
                    continue
                k, ext = split_name(m.name)
                if k != key:
                    if members:
                        yield _sample(shard, key, members)
                    key, members = k, {}
                last = _last(ext)
                if not k or last not in IMAGE_EXT | AUDIO_EXT | TEXT_EXT:
                    ignored[last or "(none)"] += 1
                    continue
                members[ext] = (m.name, tar.extractfile(m).read())
    except (tarfile.TarError, EOFError, OSError) as e:
        after = f" (after key {key!r})" if key else ""
        raise ReaderError(shard, None, None, f"not a readable tar shard{after}: {e}") from None
    if members:
        yield _sample(shard, key, members)


def _sample(shard: Path, key: str, members: dict) -> RawSample | ReaderError:
    where = f"key {key!r}"
    by_kind: dict[str, list] = {"image": [], "audio": []}
    for ext in sorted(members):
        name, data = members[ext]
        last = _last(ext)
        kind = "image" if last in IMAGE_EXT else "audio" if last in AUDIO_EXT else None
        if kind:
            by_kind[kind].append(ItemRef(field=f"member {name!r}", data=data, suffix="." + last))
    text = _text(shard, where, members)
    if isinstance(text, ReaderError):
        return text
    if text is None and not by_kind["image"] and not by_kind["audio"]:
        return ReaderError(shard, where, None, "no image, audio or text member")
    return RawSample(
        source=str(shard),
        record=where,
        id=key,
        text=text or "",
        image=by_kind["image"],
        audio=by_kind["audio"],
    )


def _text(shard: Path, where: str, members: dict) -> str | ReaderError | None:
    """The sample's text from its .txt member, else its .json member's "text"/"caption"."""
    txt = next((members[e] for e in sorted(members) if _last(e) == "txt"), None)
    js = next((members[e] for e in sorted(members) if _last(e) == "json"), None)
    if txt is None and js is None:
        return None
    name, data = txt or js
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return ReaderError(shard, where, f"member {name!r}", f"not UTF-8 text ({e.reason})")
    if txt is not None:
        return text.strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return ReaderError(shard, where, f"member {name!r}", f"not valid JSON ({e.msg})")
    value = obj.get("text", obj.get("caption")) if isinstance(obj, dict) else None
    if not isinstance(value, str):
        return ReaderError(shard, where, f"member {name!r}", 'no "text" or "caption" string')
    return value.strip()

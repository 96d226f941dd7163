"""WebDataset tar shards: a .tar file, a folder of them, or a glob ("shards/*.tar").

Members are grouped into samples by key, the member name up to the first dot of its base
name (`a/b/000123.left.jpg` has key `a/b/000123`, extension `left.jpg`); a sample's members
sit next to each other in the shard, so shards are read as streams (gzip-compressed ones
too) with one sample in memory at a time. What the last part of the extension says:

- jpg, jpeg, png, webp: an image (several per sample are kept, in extension order);
- wav (and flac, mp3, ogg when soundfile is installed): an audio clip;
- txt: the text; json: an object whose "text" (or "caption") is the text, if no txt.

Other members are counted in the summary's notes and not read. The key is the sample id.

A shard cut short (an interrupted copy or download) stops the conversion with one error
naming the shard and the byte where it breaks off: Python's tarfile takes an archive that
ends at a header, or inside one, for a complete one and would drop the samples after it.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import json
import lzma
import tarfile
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path

from entrain.data.readers.common import ItemRef, RawSample, ReaderError, ReaderOptions

USES: frozenset[str] = frozenset()
ABOUT = "WebDataset tar shards (a .tar file, a folder of shards, or a glob)"
IMAGE_EXT = frozenset({"jpg", "jpeg", "png", "webp"})
AUDIO_EXT = frozenset({"wav", "flac", "mp3", "ogg"})
TEXT_EXT = frozenset({"txt", "json"})
_SHARD_GLOBS = ("*.tar", "*.tar.gz", "*.tgz")
# What "r|*" would detect, opened by the modules that raise EOFError on a cut stream
# (tarfile's own gzip reader takes a stream cut short for a finished one).
_COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))
_BLOCK = tarfile.BLOCKSIZE


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
    member = None  # the last member header read: where a cut is reported
    opener = _opener(shard)
    try:
        with opener(shard, "rb") as raw:
            stream = _Recorder(raw)
            with tarfile.open(fileobj=stream, mode="r|") as tar:  # members in order, no index
                for m in tar:
                    member = m
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
                end = tar.offset  # where tarfile stopped: the end-of-archive marker, it hopes
            if opener is not open:  # read to the end, so the decompressor checks its trailer
                while raw.read(1 << 20):
                    pass
    except (tarfile.TarError, EOFError, OSError) as e:
        raise _unreadable(shard, opener is not open, member, e) from None
    _check_end(shard, opener is not open, stream.block(end), end, member)
    if members:
        yield _sample(shard, key, members)


def _opener(shard: Path):
    """How to open a shard: by the decompressor its first bytes name, else as plain tar."""
    try:
        with open(shard, "rb") as f:
            head = f.read(6)
    except OSError as e:
        raise ReaderError(shard, None, None, f"cannot be read ({e.strerror})") from None
    return next((op for magic, op in _COMPRESSED if head.startswith(magic)), open)


class _Recorder:
    """A shard's (decompressed) bytes as tarfile reads them, keeping the last few reads so
    that the block where tarfile stopped can be looked at afterwards."""

    def __init__(self, f):
        self.f, self.pos = f, 0
        # tarfile reads 10 KiB records and stops within one record of its last header
        self.recent: deque[tuple[int, bytes]] = deque(maxlen=8)

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        if data:
            self.recent.append((self.pos, data))
            self.pos += len(data)
        return data

    def block(self, offset: int) -> bytes:
        """The bytes of the block at `offset` the stream had: fewer than 512 where it ended."""
        start = self.recent[0][0] if self.recent else self.pos
        assert start <= offset, "tarfile stopped further back than the bytes kept"
        data = b"".join(d for _, d in self.recent)
        return data[offset - start : offset - start + _BLOCK]


def _after(member: tarfile.TarInfo | None) -> str:
    return f"after member {member.name!r}" if member else "before the first member"


def _byte(n: int, compressed: bool) -> str:
    """Offsets in a compressed shard are those of the tar stream inside it."""
    return f"byte {n}" + (" of the uncompressed archive" if compressed else "")


def _check_end(
    shard: Path, compressed: bool, block: bytes, end: int, member: tarfile.TarInfo | None
) -> None:
    """Raise unless the archive ended where tarfile stopped, at a zero block (tarfile also
    stops silently at a header cut short, a missing one, or one it cannot parse)."""
    if len(block) == _BLOCK and not any(block):
        return
    if len(block) == _BLOCK:
        at = _byte(end, compressed)
        raise ReaderError(shard, None, None, f"no valid tar header at {at} ({_after(member)})")
    if block:
        cut = (
            f"it ends at {_byte(end + len(block), compressed)}, inside the header that "
            f"starts at byte {end} ({_after(member)})"
        )
    else:
        cut = f"it ends at {_byte(end, compressed)} {_after(member)}, with no end-of-archive marker"
    raise ReaderError(shard, None, None, f"truncated tar shard: {cut}; copy or write it again")


def _unreadable(
    shard: Path, compressed: bool, member: tarfile.TarInfo | None, e: Exception
) -> ReaderError:
    """The error for a shard tarfile (or its decompressor) gave up on: a cut when the
    shard ends before the member (or first header) being read does, else what it said."""
    if compressed and isinstance(e, EOFError):
        cut = (
            f"the compressed file ends at byte {shard.stat().st_size} before its "
            f"end-of-stream marker ({_after(member)})"
        )
        return ReaderError(shard, None, None, f"truncated tar shard: {cut}; copy or write it again")
    size = shard.stat().st_size
    if not compressed and 0 < size:
        if member is None and size < _BLOCK:
            cut = f"it ends at byte {size}, inside the first header"
        elif member is not None and size < _member_end(member):
            cut = (
                f"it ends at byte {size}, inside member {member.name!r} (bytes "
                f"{member.offset} to {_member_end(member)})"
            )
        else:
            cut = None
        if cut:
            return ReaderError(
                shard, None, None, f"truncated tar shard: {cut}; copy or write it again"
            )
    return ReaderError(shard, None, None, f"not a readable tar shard ({_after(member)}): {e}")


def _member_end(m: tarfile.TarInfo) -> int:
    """Where a member's data ends, padded to whole blocks as tar lays it out."""
    return m.offset_data + -(-m.size // _BLOCK) * _BLOCK


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

"""What the data set readers share: options, the error type, a sample as a reader finds it,
sizes from file headers, token counts, and the manifest writer.

A reader only parses its format into `RawSample`s (text plus image and audio items, each a
file on disk or bytes held in the source). Everything that touches item contents (header
reads, writing bytes out) and tokenization happens here, once for all formats, so the
three readers report errors and lay out files the same way.
"""

from __future__ import annotations

import io
import json
import math
import os
import wave
from dataclasses import asdict, dataclass, field
from pathlib import Path

from entrain.data.chat import ChatError, media_counts, parse_messages, text_tokens_of
from entrain.data.codec import ByteTokenizer, HFCodec
from entrain.data.sequence import LayoutError
from entrain.data.video import VideoError, sampled_frames, video_info

ESTIMATE = "estimate"
BYTES = "bytes"
MAX_EXAMPLES = 20  # skipped records whose reasons the summary keeps (the count is exact)
_IMAGE_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "TIFF": ".tif"}


@dataclass(kw_only=True)
class ReaderOptions:
    """How to read a data set; each reader uses only the options that apply to its format."""

    tokenizer: str | None = None
    """A local Hugging Face tokenizer folder; "bytes" for Entrain's byte tokenizer (what
    `entrain train` counts: one token per UTF-8 byte); None for the estimate."""
    image_root: str | None = None
    """Folder that relative image/audio paths are relative to (default: the input's folder)."""
    text_column: str = "text"
    """hf: column holding the text (a string, or a list of conversation turns)."""
    image_column: str | None = None
    """hf: column holding images (bytes, {"bytes", "path"}, a path, or a list of these)."""
    audio_column: str | None = None
    """hf: column holding audio, in the same forms as images."""
    id_column: str = "id"
    """hf: column holding sample ids; without it, ids are row numbers."""
    skip_bad: bool = False
    """Leave out records that cannot be converted (counted, with reasons) instead of stopping."""
    video_fps: float = 2.0
    """Frames a second a video is sampled at (qwen-vl-utils' default): the manifest's frame
    count is its length times this."""

    def __post_init__(self):
        for name in ("text_column", "image_column", "audio_column", "id_column"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v):
                raise ValueError(f"{name} must be a non-empty column name, got {v!r}")
        if self.tokenizer == "":
            raise ValueError("tokenizer must be a folder, 'bytes', or None for the estimate")
        if not isinstance(self.video_fps, int | float) or not self.video_fps > 0:
            raise ValueError(f"video_fps must be a number > 0, got {self.video_fps!r}")

    def changed(self) -> set[str]:
        """Names of options set to something other than their default."""
        default = ReaderOptions()
        return {k for k, v in asdict(self).items() if v != getattr(default, k)}


class ReaderError(ValueError):
    """A record (or a whole input file) that cannot be converted.

    The message names the input file, the record and the field, e.g.
    `data.json: record 12 (id 'abc'): image 'x.png': no such file`.
    """

    def __init__(self, source: str | os.PathLike, record: str | None, field: str | None, msg: str):
        self.source, self.record, self.field, self.msg = str(source), record, field, msg
        parts = [self.source] + [p for p in (record, field) if p]
        super().__init__(": ".join(parts) + ": " + msg)


class ItemError(ValueError):
    """What is wrong with one item's contents; the caller adds file, record and field."""


@dataclass
class ItemRef:
    """One image or audio item: a file on disk, or bytes held in the source (written out)."""

    field: str  # how errors name it, e.g. "image 'x.png'" or "member 'k.jpg'"
    path: Path | None = None
    data: bytes | None = None
    suffix: str = ""  # the source's extension for bytes (".mp3"); WAV and images are sniffed


@dataclass
class RawSample:
    """A record as a reader parsed it, before its items are measured."""

    source: str  # input file
    record: str  # where in it, e.g. "record 12 (id 'abc')"
    id: str
    text: str
    image: list[ItemRef] = field(default_factory=list)
    audio: list[ItemRef] = field(default_factory=list)
    video: list[ItemRef] = field(default_factory=list)
    messages: list[dict] | None = None
    """The conversation in the chat format (data/chat.py), when the record is one; `text`
    then joins its turns (for the estimate)."""

    def error(self, fld: str | None, msg: str) -> ReaderError:
        return ReaderError(self.source, self.record, fld, msg)


def record_label(kind: str, index: int | str, sid: str | None) -> str:
    """'record 12 (id 'abc')': where a record sits, and its id once known."""
    return f"{kind} {index}" + (f" (id {sid!r})" if sid is not None else "")


def as_id(value: object) -> str | None:
    """A source's id value as a manifest id (integers are common), or None if unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    return value if isinstance(value, str) and value else None


def conversation_of(sample: RawSample, turns: object) -> list[dict] | None:
    """The record's turns as chat messages (ShareGPT `from`/`value` or `role`/`content`), with
    images no turn marks put in front of the first user turn (LLaVA's convention); None when
    `turns` is not a conversation."""
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) for t in turns):
        return None
    key = "conversations" if all("value" in t for t in turns) else "messages"
    try:
        messages = parse_messages({key: turns})
    except ChatError as e:
        raise sample.error(key, str(e)) from None
    marked = media_counts(messages)
    for m in ("image", "video", "audio"):
        n = len(getattr(sample, m))
        if marked[m] == 0 and n:
            first = next((x for x in messages if x["role"] == "user"), messages[0])
            first["content"] = [{"type": m} for _ in range(n)] + first["content"]
        elif marked[m] != n:
            raise sample.error(
                key, f"{marked[m]} <{m}> placeholder(s) in the turns but {n} {m} item(s)"
            )
    return messages


def conversation_text(value: object) -> str | None:
    """The text of a conversation-shaped value, or None if it holds none.

    Strings are taken as they are; lists are joined with newlines; dicts give their "value"
    (ShareGPT), "content" (chat messages) or "text" (content parts). `<image>` placeholders
    are dropped: each image is a separate item, counted from its own size.
    """
    if isinstance(value, str):
        return value.replace("<image>", "").strip()
    if isinstance(value, list):
        parts = [conversation_text(v) for v in value]
        if any(p is None for p in parts):
            return None
        return "\n".join(p for p in parts if p)
    if isinstance(value, dict):
        for key in ("value", "content", "text"):
            if key in value:
                return conversation_text(value[key]) if value[key] is not None else ""
        return ""  # a content part without text (an image part)
    return None


# ---------------------------------------------------------------------- sizes from headers


def image_size(ref: ItemRef) -> tuple[int, int, str]:
    """(height, width, extension) from the image header; the pixels are not decoded."""
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("reading image sizes needs Pillow: pip install entrain[data]") from None
    src = io.BytesIO(ref.data) if ref.data is not None else ref.path
    try:
        with Image.open(src) as im:  # lazy: reads the header only
            w, h = im.size
            ext = _IMAGE_EXT.get(im.format or "", "." + (im.format or "img").lower())
    except FileNotFoundError:
        raise ItemError(f"no such file (looked for {ref.path})") from None
    except Image.DecompressionBombError as e:
        raise ItemError(str(e)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ItemError(f"not a readable image ({e})") from None
    if h <= 0 or w <= 0:
        raise ItemError(f"the header gives an empty image ({w} x {h})")
    return h, w, ext  # the real format's, whatever the source's file name says


def _soundfile():
    """The soundfile module if it is installed and its library loads, else None."""
    try:
        import soundfile
    except (ImportError, OSError):
        return None
    return soundfile


def _open(ref: ItemRef):
    """A fresh binary file object of the item, from its bytes or its path."""
    return io.BytesIO(ref.data) if ref.data is not None else open(ref.path, "rb")  # noqa: SIM115


def audio_seconds(ref: ItemRef) -> tuple[float, str]:
    """(duration in seconds, extension) from the audio header.

    WAV (PCM) is read with the stdlib `wave`; any other format, or a WAV encoding `wave`
    cannot read, needs `soundfile`, used when it is installed.
    """
    try:
        with _open(ref) as f:
            head = f.read(12)
    except FileNotFoundError:
        raise ItemError(f"no such file (looked for {ref.path})") from None
    except OSError as e:
        raise ItemError(f"cannot read ({e})") from None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        try:
            with _open(ref) as f, wave.open(f, "rb") as w:
                seconds = w.getnframes() / w.getframerate()
        except (wave.Error, EOFError, ZeroDivisionError) as e:
            sf = _soundfile()  # only now: most WAVs never need it
            if sf is None:
                raise ItemError(
                    f"not a WAV file the stdlib can read ({e}); for other encodings, "
                    "pip install soundfile"
                ) from None
            seconds = _soundfile_seconds(sf, ref)
        ext = ".wav"
    else:
        sf = _soundfile()
        if sf is None:
            raise ItemError(
                "not a WAV file: only WAV is supported unless soundfile is installed "
                "(pip install soundfile)"
            )
        seconds = _soundfile_seconds(sf, ref)
        ext = ref.suffix or (ref.path.suffix if ref.path else "") or ".audio"
    if not (math.isfinite(seconds) and seconds > 0):
        raise ItemError(f"holds no audio (duration {seconds} s)")
    return seconds, ext


def _soundfile_seconds(sf, ref: ItemRef) -> float:
    try:
        with _open(ref) as f:
            return float(sf.info(f).duration)
    except Exception as e:  # soundfile raises its own error types (and RuntimeError)
        raise ItemError(f"not a readable audio file ({e})") from None


# ---------------------------------------------------------------------------- text tokens


class TokenCounter:
    """Counts the tokens of a sample's text or conversation, in one of three ways (`name`
    says which):

    - a Hugging Face tokenizer loaded from a local folder (`"hf:<folder>"`). When the folder
      is a model's (its config.json names a supported model), the count is exactly what
      `entrain train --model <folder>` counts: conversations rendered with the chat
      template, the model's placeholders around each item (data/chat.py). A bare tokenizer
      folder counts the text's own tokens without special tokens (an approximation: no
      template, no placeholders);
    - `"bytes"`: what Entrain's byte tokenizer (the presets' `entrain train`) counts;
    - `"estimate"` when no tokenizer is given: ceil(UTF-8 bytes / 4), the usual ~4 bytes a
      token of English BPE vocabularies; good for planning, not exact.
    """

    def __init__(self, tokenizer: str | None):
        self.codec = None
        self.exact = True
        if tokenizer is None:
            self.name = ESTIMATE
        elif tokenizer == BYTES:
            self.name = BYTES
            self.codec = ByteTokenizer(512)
        else:
            model = _model_of(tokenizer)
            self.codec = HFCodec(tokenizer, model)
            self.exact = model is not None
            self.name = f"hf:{tokenizer}"

    def count(self, sample: RawSample) -> int:
        if self.codec is None:
            return math.ceil(len(sample.text.encode("utf-8")) / 4)
        if not self.exact:
            return len(self.codec.encode(sample.text))
        counts = {m: len(getattr(sample, m)) for m in ("image", "video", "audio")}
        try:
            return text_tokens_of(sample.id, sample.text, sample.messages, counts, self.codec)
        except (ChatError, LayoutError) as e:
            raise sample.error(None, str(e).split(": ", 1)[-1]) from None


def _model_of(folder: str):
    """The folder's model (for its placeholder ids), or None for a bare tokenizer folder."""
    from entrain.models.hf import VISION_LANGUAGE, hf_model, model_type

    if not (Path(folder) / "config.json").is_file() or model_type(folder) not in VISION_LANGUAGE:
        return None
    return hf_model(folder)


# ------------------------------------------------------------------------------ summary


@dataclass
class Summary:
    """What a conversion did; nothing is left out without being counted here."""

    format: str
    input: str
    output: str
    tokenizer: str
    written: int = 0
    skipped: int = 0
    files_written: int = 0
    files_dir: str | None = None
    skipped_examples: list[str] = field(default_factory=list)
    """The first MAX_EXAMPLES reasons for skipped records."""
    notes: list[str] = field(default_factory=list)
    """Things the user may not expect (an ignored column, tar members of unknown type)."""

    def skip(self, e: ReaderError) -> None:
        self.skipped += 1
        if len(self.skipped_examples) < MAX_EXAMPLES:
            self.skipped_examples.append(str(e))

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------- writing


def measure(
    sample: RawSample, counter: TokenCounter, fps: float = 2.0
) -> tuple[dict, dict[str, list]]:
    """The manifest record of a sample (without "files") and its items with extensions."""
    rec: dict = {"id": sample.id, "text_tokens": counter.count(sample)}
    items: dict[str, list] = {}
    sizes = []
    for ref in sample.image:
        try:
            h, w, ext = image_size(ref)
        except ItemError as e:
            raise sample.error(ref.field, str(e)) from None
        sizes.append([h, w])
        items.setdefault("image", []).append((ref, ext))
    if sizes:
        rec["image"] = sizes
    seconds = []
    for ref in sample.audio:
        try:
            s, ext = audio_seconds(ref)
        except ItemError as e:
            raise sample.error(ref.field, str(e)) from None
        seconds.append(s)
        items.setdefault("audio", []).append((ref, ext))
    if seconds:
        rec["audio"] = seconds
    videos = []
    for ref in sample.video:
        if ref.path is None:
            raise sample.error(ref.field, "videos held as bytes are not supported; give paths")
        try:
            info = video_info(ref.path)
        except VideoError as e:
            raise sample.error(ref.field, str(e)) from None
        videos.append([sampled_frames(info, fps), info.height, info.width])
        items.setdefault("video", []).append((ref, ""))
    if videos:
        rec["video"] = videos
        rec["video_fps"] = fps
    return rec, items


class ManifestWriter:
    """Writes records line by line to `<output>.tmp`, renamed to `output` at the end (a
    reader never sees half a manifest). Items held as bytes go under `<stem>_files/`, a
    folder per thousand files (a flat folder of millions is slow on most file systems)."""

    def __init__(self, output: str | os.PathLike, tokenizer: str):
        self.output = Path(output)
        self.files_dir = self.output.with_name(self.output.stem + "_files")
        self.tokenizer = tokenizer
        self.written = 0
        self.files_written = 0
        self._first_line: dict[str, int] = {}  # id -> its line, to name the first on a repeat
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.output.with_name(self.output.name + ".tmp")
        self._f = open(self._tmp, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def add(self, sample: RawSample, rec: dict, items: dict[str, list]) -> None:
        first = self._first_line.get(sample.id)
        if first is not None:
            raise sample.error("id", f"duplicate id (already on line {first} of {self.output})")
        files = {m: [self._place(ref, ext) for ref, ext in refs] for m, refs in items.items()}
        rec = {**rec, "text": sample.text, "files": files, "tokenizer": self.tokenizer}
        if sample.messages is not None:  # what training renders; "text" is for reading
            rec["messages"] = sample.messages
        self._f.write(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n")
        self.written += 1
        self._first_line[sample.id] = self.written

    def _place(self, ref: ItemRef, ext: str) -> str:
        """The item's path relative to the manifest, writing its bytes out if it has any."""
        if ref.data is not None:
            n = self.files_written
            path = self.files_dir / f"{n // 1000:05d}" / f"{n:08d}{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(ref.data)
            self.files_written += 1
        else:
            path = Path(ref.path)
        try:
            rel = os.path.relpath(os.path.abspath(path), os.path.abspath(self.output.parent))
        except ValueError:  # another drive (Windows): an absolute path works as well
            rel = os.path.abspath(path)
        return Path(rel).as_posix()

    def close(self, ok: bool) -> None:
        """Finish: rename into place if `ok` and something was written, else remove."""
        self._f.close()
        if ok and self.written:
            os.replace(self._tmp, self.output)
        else:
            self._tmp.unlink(missing_ok=True)

"""Checking every sample of a training manifest against its files, before training.

The scheduler plans with the sizes a manifest states; the runtime computes with the files.
A file that is missing, does not decode, or disagrees with its manifest line would
otherwise surface as a crash (or a shape mismatch) in the middle of a distributed step,
far from the sample that caused it. `validate_samples` reads every file once up front and
returns one `BadSample` per sample with problems, each naming the manifest line, the
sample and the file, so training can stop with a clear message or skip those samples.

The checks decode files the way the runtime does (`PIL.Image.load`, `inputs.read_wav`)
and under the same PIL settings: with `ImageFile.LOAD_TRUNCATED_IMAGES` at its default,
False, a truncated image fails here as it would in training.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image

from entrain.cost.batch import cost_batch
from entrain.data.chat import ChatError, tokens_of
from entrain.data.codec import ByteTokenizer, TextCodec
from entrain.data.sequence import LayoutError, workload_items
from entrain.models.spec import AudioSpec, ModelSpec, VisionSpec
from entrain.runtime.inputs import (
    SAMPLE_RATE,
    Record,
    SampleError,
    read_wav,
    video_arrays,
    video_header,
)
from entrain.workload.columnar import ItemTable, Workload

DURATION_TOLERANCE = 0.01
"""Seconds an audio file may differ from its manifest duration (the manifest rounds to
4 decimals); the encoder positions must also agree, see `_audio_positions`."""

# Kinds of problem, for `summary`: (singular, plural).
MISSING_FILE = "missing file"
CORRUPT_IMAGE = "corrupt image"
IMAGE_SIZE = "image size mismatch"
CORRUPT_AUDIO = "corrupt audio file"
EMPTY_AUDIO = "empty audio file"
AUDIO_DURATION = "audio duration mismatch"
FILE_COUNT = "file count mismatch"
CORRUPT_VIDEO = "corrupt video"
VIDEO_SIZE = "video size mismatch"
TEXT_TOKENS = "text token mismatch"
NO_ENCODER = "modality without an encoder"
TOO_LARGE = "sample over --max-sample-tokens"
_PLURAL = {
    MISSING_FILE: "missing files",
    CORRUPT_IMAGE: "corrupt images",
    IMAGE_SIZE: "image size mismatches",
    CORRUPT_AUDIO: "corrupt audio files",
    EMPTY_AUDIO: "empty audio files",
    AUDIO_DURATION: "audio duration mismatches",
    FILE_COUNT: "file count mismatches",
    TEXT_TOKENS: "text token mismatches",
    NO_ENCODER: "modalities without an encoder",
    TOO_LARGE: "samples over --max-sample-tokens",
}


@dataclass(frozen=True)
class BadSample:
    """A sample that cannot be trained on as its manifest line describes it."""

    index: int
    """Position in the manifest's sample list (blank lines skipped), as in `load_records`."""
    id: str
    line: int
    """1-based manifest line."""
    reason: str
    """What is wrong, naming the file, e.g. "image[0] (data/images/x.png): cannot decode:
    image file is truncated"; several problems of one sample are joined with "; "."""
    kind: str = "bad sample"
    """The kind of the first problem (one of the constants above), for `summary`."""

    def message(self, manifest: str | PathLike) -> str:
        return f"{manifest}:{self.line}: sample {self.id!r}: {self.reason}"


def validate_samples(
    records: Sequence[Record],
    workload: Workload,
    spec: ModelSpec,
    max_sample_tokens: int | None = None,
    on_progress: Callable[[int], None] | None = None,
    workers: int = 1,
    decode: bool = True,
    codec: TextCodec | None = None,
) -> list[BadSample]:
    """Every sample whose files or sizes would fail in training, in manifest order.

    `records` and `workload` are the same manifest read by `load_records` and
    `read_manifest`. Per sample:

    - each image exists, decodes fully (corrupt and truncated files fail) and converts to
      RGB, and its (height, width) equals the manifest's size;
    - each audio file exists, is a readable 16-bit 16 kHz WAV with at least one sample, and
      lasts the manifest's seconds within `DURATION_TOLERANCE`, with the same encoder
      positions per chunk as the manifest's seconds give (else the LLM sequence would not
      have the length the step was planned with);
    - the text marks its items consistently and has the manifest's `text_tokens` under the
      run's tokenizer (`codec`; default the byte tokenizer), placeholders expanded;
    - the model has an encoder for every modality the sample holds;
    - with `max_sample_tokens`, the sample's LLM tokens (text + modality tokens, as
      `cost_batch` counts them) do not exceed it.

    `on_progress(1)` is called once per sample checked. `workers` > 1 reads files in that
    many threads (PIL and zlib decode outside the GIL); the result is the same. With
    `decode=False` images are checked from their headers only (existence, format, size):
    much faster on a large data set, but a file corrupt or truncated past its header is
    then found only when training reaches it.
    """
    if len(records) != len(workload) or any(
        r.id != i or r.line != int(ln) for r, i, ln in zip(records, workload.ids, workload.line)
    ):
        raise ValueError("records and workload do not come from the same manifest")
    if max_sample_tokens is not None and max_sample_tokens < 1:
        raise ValueError(f"--max-sample-tokens must be >= 1, got {max_sample_tokens}")
    n = len(records)
    early: list[list[tuple[str, str]]] = [[] for _ in range(n)]  # problems not about files

    codec = codec or ByteTokenizer(spec.llm.vocab_size)
    known = Workload(
        workload.ids,
        workload.text_tokens,
        {m: t if spec.encoder_for(m) else ItemTable.empty(m) for m, t in workload.items.items()},
        workload.line,
    )
    for s, (rec, its, declared) in enumerate(
        zip(records, workload_items(known, spec), workload.text_tokens.tolist())
    ):
        try:
            have = tokens_of(rec.id, rec.text, rec.messages, its, codec).text_tokens
        except (LayoutError, ChatError) as e:
            early[s].append((TEXT_TOKENS, str(e).split(": ", 1)[-1]))
            continue
        if have != declared:
            early[s].append(
                (TEXT_TOKENS, f"declares text_tokens={declared} but its text has {have} tokens")
            )

    # Items no encoder takes are reported and left out of the token count (cost_batch
    # would refuse the whole workload).
    items = dict(workload.items)
    for modality, table in workload.items.items():
        if len(table) and spec.encoder_for(modality) is None:
            counts = np.bincount(table.sample, minlength=n)
            for s in np.flatnonzero(counts).tolist():
                early[s].append(
                    (
                        NO_ENCODER,
                        f"has {counts[s]} {modality} item(s) but model {spec.name!r} has no "
                        f"encoder for {modality}",
                    )
                )
            items[modality] = ItemTable.empty(modality)
    late: list[list[tuple[str, str]]] = [[] for _ in range(n)]  # checked after the files
    if max_sample_tokens is not None and n:
        costed = Workload(workload.ids, workload.text_tokens, items, workload.line)
        llm = cost_batch(costed, spec).llm_tokens
        for s in np.flatnonzero(llm > max_sample_tokens).tolist():
            late[s].append(
                (
                    TOO_LARGE,
                    f"{int(llm[s])} LLM tokens, more than --max-sample-tokens {max_sample_tokens}",
                )
            )

    audio_enc = spec.encoder_for("audio")
    audio_enc = audio_enc if isinstance(audio_enc, AudioSpec) else None
    images = _per_sample(workload.items["image"], n)
    audio = _per_sample(workload.items["audio"], n)
    videos = _per_sample(workload.items["video"], n)
    vision = spec.encoder_for("video")

    def check(s: int) -> list[tuple[str, str]]:
        found = _check_files(records[s], images[s], audio[s], audio_enc, decode)
        return found + _check_videos(records[s], videos[s], vision, decode)

    out: list[BadSample] = []

    def collect(s: int, found: list[tuple[str, str]]) -> None:
        problems = found + early[s] + late[s]
        if problems:
            rec = records[s]
            reason = "; ".join(r for _, r in problems)
            out.append(BadSample(s, rec.id, rec.line, reason, problems[0][0]))
        if on_progress:
            on_progress(1)

    if workers > 1 and n > 1:
        with ThreadPoolExecutor(workers) as pool:
            for s, found in enumerate(pool.map(check, range(n))):
                collect(s, found)
    else:
        for s in range(n):
            collect(s, check(s))
    return out


def summary(bad: Sequence[BadSample], manifest: str | PathLike, show: int = 5) -> str:
    """A count of bad samples by kind of (first) problem, then the first `show` messages,
    one a line, e.g. "3 bad sample(s) in data.jsonl: 2 corrupt images, 1 missing file"."""
    if not bad:
        return f"no bad samples in {manifest}"
    counts = Counter(b.kind for b in bad)
    kinds = ", ".join(f"{c} {k if c == 1 else _PLURAL.get(k, k)}" for k, c in counts.most_common())
    lines = [f"{len(bad)} bad sample(s) in {manifest}: {kinds}"]
    lines += [f"  {b.message(manifest)}" for b in bad[:show]]
    if len(bad) > show:
        lines.append(f"  ... and {len(bad) - show} more")
    return "\n".join(lines)


def _per_sample(table: ItemTable, n: int) -> list[np.ndarray]:
    """The item sizes of each sample, in manifest order."""
    bounds = np.searchsorted(table.sample, np.arange(n + 1))
    return [table.size[bounds[s] : bounds[s + 1]] for s in range(n)]


def _error(e: BaseException) -> str:
    text = str(e).strip()
    return text if text else type(e).__name__


def _missing(path: Path) -> str | None:
    if not path.exists():
        return "file not found"
    if not path.is_file():
        return "not a regular file"
    return None


def _check_files(
    rec: Record,
    image_sizes: np.ndarray,
    audio_seconds: np.ndarray,
    audio_enc: AudioSpec | None,
    decode: bool = True,
) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    for modality, paths, sizes in (
        ("image", rec.images, image_sizes),
        ("audio", rec.audio, audio_seconds),
    ):
        if len(paths) != len(sizes):
            problems.append(
                (FILE_COUNT, f"{len(paths)} {modality} file(s) but {len(sizes)} size(s)")
            )
    for k, (path, size) in enumerate(zip(rec.images, image_sizes)):
        where = f"image[{k}] ({path})"
        why = _check_image(path, (int(size[0]), int(size[1])), decode)
        if why:
            problems.append((why[0], f"{where}: {why[1]}"))
    for k, (path, size) in enumerate(zip(rec.audio, audio_seconds)):
        where = f"audio[{k}] ({path})"
        why = _check_audio(path, float(size[0]), rec.id, audio_enc)
        if why:
            problems.append((why[0], f"{where}: {why[1]}"))
    return problems


def _check_videos(rec: Record, sizes: np.ndarray, vision, decode: bool) -> list[tuple[str, str]]:
    """Each video is there, decodes (with `decode`: every frame the runtime will take, as
    it will take them), has the manifest's frame size, and at least its frame count."""
    problems: list[tuple[str, str]] = []
    if len(rec.videos) != len(sizes):
        problems.append((FILE_COUNT, f"{len(rec.videos)} video file(s) but {len(sizes)} size(s)"))
    for k, (path, size) in enumerate(zip(rec.videos, sizes)):
        where = f"video[{k}] ({path})"
        if not path.exists():
            problems.append((MISSING_FILE, f"{where}: file not found"))
            continue
        frames, h, w = (int(v) for v in size)
        try:
            if decode and isinstance(vision, VisionSpec):
                video_arrays(path, (frames, h, w), vision, rec.id)
                continue
            have, hh, ww = video_header(path, rec.id)
        except SampleError as e:
            text = str(e).removeprefix(f"sample {rec.id!r}: ")
            kind = VIDEO_SIZE if "frames but the manifest says" in text else CORRUPT_VIDEO
            problems.append((kind, text))
            continue
        if (hh, ww) != (h, w):
            problems.append(
                (VIDEO_SIZE, f"{where}: {hh}x{ww} frames but the manifest says {h}x{w}")
            )
        elif have < frames:
            problems.append(
                (CORRUPT_VIDEO, f"{where}: has {have} frames, fewer than the manifest's {frames}")
            )
    return problems


def _check_image(path: Path, want: tuple[int, int], decode: bool = True) -> tuple[str, str] | None:
    missing = _missing(path)
    if missing:
        return MISSING_FILE, missing
    try:
        with Image.open(path) as im:
            if decode:
                im.load()  # decodes every pixel: a corrupt or truncated file fails here
                if im.mode != "RGB":
                    im.convert("RGB")  # as image_patches does; some modes cannot
            have = (im.height, im.width)
    except Image.UnidentifiedImageError:
        return CORRUPT_IMAGE, "cannot decode: not an image format PIL recognizes"
    except Exception as e:  # PIL raises OSError, SyntaxError, zlib.error, ... on bad data
        return CORRUPT_IMAGE, f"cannot decode: {_error(e)}"
    if have != want:
        return IMAGE_SIZE, (
            f"is {have[0]}x{have[1]} pixels (height x width) but the manifest says "
            f"{want[0]}x{want[1]}"
        )
    return None


def _check_audio(
    path: Path, want: float, sample: str, enc: AudioSpec | None
) -> tuple[str, str] | None:
    missing = _missing(path)
    if missing:
        return MISSING_FILE, missing
    try:
        audio = read_wav(path, sample)
    except SampleError as e:
        text = str(e).removeprefix(f"sample {sample!r}: ")
        text = text.replace(f" {path}:", ":").replace(f"{path} ", "")
        return (EMPTY_AUDIO if "holds no audio" in text else CORRUPT_AUDIO), text
    except Exception as e:  # e.g. a byte count that is not whole 16-bit frames
        return CORRUPT_AUDIO, f"cannot read audio: {_error(e)}"
    have = len(audio) / SAMPLE_RATE
    if abs(have - want) > DURATION_TOLERANCE + 1e-9:
        return AUDIO_DURATION, (
            f"lasts {have:.4f} s but the manifest says {want:g} s "
            f"(more than {DURATION_TOLERANCE:g} s apart)"
        )
    if enc is not None:
        from_file = _audio_positions(enc, samples=len(audio))
        planned = _audio_positions(enc, seconds=want)
        if from_file != planned:
            return AUDIO_DURATION, (
                f"lasts {have:.4f} s, which gives {sum(from_file)} encoder position(s) in "
                f"{len(from_file)} chunk(s), but the manifest's {want:g} s gives "
                f"{sum(planned)} in {len(planned)}"
            )
    return None


def _audio_positions(
    enc: AudioSpec, samples: int | None = None, seconds: float | None = None
) -> list[int]:
    """Valid encoder positions of each chunk: from the file's sample count as
    `inputs.log_mel` computes them, or from the manifest's seconds as
    `cost.tokens.audio_units` plans them."""
    fps, chunk_s = enc.frames_per_second, enc.chunk_seconds
    if samples is not None:
        chunk = int(round(chunk_s * SAMPLE_RATE))
        return [
            max(1, math.ceil(min(chunk, samples - i) / SAMPLE_RATE * fps - 1e-9))
            for i in range(0, samples, chunk)
        ]
    assert seconds is not None
    units = max(1, math.ceil(seconds / chunk_s - 1e-9))
    return [math.ceil(min(chunk_s, seconds - k * chunk_s) * fps - 1e-9) for k in range(units)]

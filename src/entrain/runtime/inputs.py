"""Turning a sample's files into model inputs: image patches, audio log-mels, text ids.

A manifest line for training carries, besides the sizes of docs/design.md section 4, the data:
`"text"` (the sample's text) and `"files": {"image": [...], "audio": [...]}` (paths relative
to the manifest). The sizes in the manifest must match the files: the scheduler plans with
the sizes, the runtime computes with the files.
"""

from __future__ import annotations

import json
import math
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from entrain.cost.tokens import smart_resize
from entrain.data.chat import ChatError, parse_messages, text_tokens_of
from entrain.data.codec import TextCodec
from entrain.data.video import VideoError, video_frames, video_info
from entrain.models.spec import AudioSpec, VisionSpec
from entrain.workload.manifest import ManifestError, parse_record

# CLIP / Qwen2-VL normalization
IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
SAMPLE_RATE = 16_000
DEFAULT_VIDEO_FPS = 2.0
"""qwen-vl-utils samples videos at 2 frames a second."""


class SampleError(ValueError):
    """A sample whose files cannot be used; names the sample and the file."""


@dataclass
class Record:
    """One training sample as the runtime sees it."""

    id: str
    line: int
    text: str | None
    """Plain text (every token trained), or None for a conversation."""
    images: list[Path]
    audio: list[Path]
    videos: list[Path] = field(default_factory=list)
    """Video files, or folders of frames."""
    messages: list[dict] | None = None
    """A conversation (data/chat.py): assistant turns trained, rendered with the template."""
    video_fps: float = DEFAULT_VIDEO_FPS
    """Frames a second the manifest's video frame counts were sampled at."""

    def files(self, modality: str) -> list[Path]:
        return {"image": self.images, "audio": self.audio, "video": self.videos}[modality]


def _record(manifest: Path, lineno: int, line: str) -> Record:
    rec = parse_record(manifest, lineno, line)
    files = rec.get("files") or {}
    if not isinstance(files, dict):
        raise ManifestError(
            manifest, lineno, "files", 'expected {"image": [...], "video": [...], "audio": [...]}'
        )
    try:
        messages = parse_messages(rec)
    except ChatError as e:
        field_, _, msg = str(e).partition(": ")
        raise ManifestError(manifest, lineno, field_, msg) from None
    if messages is None and not isinstance(rec.get("text"), str):
        raise ManifestError(
            manifest, lineno, "text", 'training needs the sample\'s "text" (a string) or "messages"'
        )
    for modality in ("image", "video", "audio"):
        n_sizes, n_files = len(rec.get(modality) or []), len(files.get(modality) or [])
        if n_sizes != n_files:
            raise ManifestError(
                manifest,
                lineno,
                f"files.{modality}",
                f"{n_files} file(s) but {n_sizes} {modality} size(s) in '{modality}'",
            )
    fps = rec.get("video_fps", DEFAULT_VIDEO_FPS)
    if not isinstance(fps, int | float) or isinstance(fps, bool) or not fps > 0:
        raise ManifestError(manifest, lineno, "video_fps", f"expected a number > 0, got {fps!r}")
    where = {
        m: [manifest.parent / p for p in files.get(m) or []] for m in ("image", "video", "audio")
    }
    return Record(
        id=rec["id"],
        line=lineno,
        text=rec.get("text") if messages is None else None,
        images=where["image"],
        audio=where["audio"],
        videos=where["video"],
        messages=messages,
        video_fps=float(fps),
    )


def load_records(manifest: str | Path) -> list[Record]:
    """Every sample of a training manifest, validated (sizes as in any manifest, plus the
    text or conversation and the files)."""
    manifest = Path(manifest)
    out = []
    with open(manifest, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                out.append(_record(manifest, lineno, line))
    if not out:
        raise ManifestError(manifest, None, None, "the manifest holds no samples (empty file)")
    return out


def _patchify(x: np.ndarray, p: int, m: int) -> np.ndarray:
    """(tps, C, H, W) frames -> (H/p * W/p, C * tps * p * p) patches in Qwen2-VL's order:
    merge x merge groups of patch squares, row by row."""
    tps, c, h, w = x.shape
    gh, gw = h // p, w // p
    x = x.reshape(1, tps, c, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x).reshape(gh * gw, c * tps * p * p)


def _normalized(img: Image.Image, h: int, w: int) -> np.ndarray:
    """(C, h, w) float32, resized with PIL's bicubic filter and CLIP-normalized, as Qwen2-VL's
    image processor does."""
    img = img.resize((int(w), int(h)), Image.Resampling.BICUBIC)
    x = (np.asarray(img, dtype=np.float32) / 255.0 - IMAGE_MEAN) / IMAGE_STD  # (H, W, C)
    return x.transpose(2, 0, 1)


def image_arrays(path: Path, spec: VisionSpec, sample: str) -> tuple[np.ndarray, np.ndarray]:
    """(patches, grid_thw) of one image in Qwen2-VL's layout: resized by the spec's rule,
    repeated to a temporal patch, cut into patch_size squares grouped merge x merge."""
    try:
        with Image.open(path) as im:
            img = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise SampleError(f"sample {sample!r}: cannot read image {path}: {e}") from None
    p, m, tps = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    hb, wb = smart_resize(
        np.array([img.height]), np.array([img.width]), p * m, spec.min_pixels, spec.max_pixels
    )
    x = np.repeat(_normalized(img, hb[0], wb[0])[None], tps, axis=0)  # (tps, C, H, W)
    return _patchify(x, p, m), np.array([[1, hb[0] // p, wb[0] // p]], dtype=np.int64)


def image_patches(path: Path, spec: VisionSpec, sample: str) -> tuple[torch.Tensor, torch.Tensor]:
    patches, grid = image_arrays(path, spec, sample)
    return torch.from_numpy(patches), torch.from_numpy(grid)


def video_header(path: Path, sample: str) -> tuple[int, int, int]:
    """(frames, height, width) of a video file or folder of frames, from headers only."""
    try:
        info = video_info(path)
    except VideoError as e:
        raise SampleError(f"sample {sample!r}: {e}") from None
    return info.frames, info.height, info.width


def video_arrays(
    path: Path, size: tuple[int, int, int], spec: VisionSpec, sample: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per temporal patch of a video (frames padded to a multiple of temporal_patch_size by
    repeating the last), its (patches, grid_thw): each is one unit the encoder runs on its
    own (Qwen2-VL's ViT attends within a temporal patch), so a long video can be spread
    over encoder microbatches. Frames are resized as the processor resizes video frames
    (the per-frame bounds and the whole video's pixel budget)."""
    from entrain.cost.tokens import image_grid

    frames, h, w = (int(v) for v in size)
    try:
        images = video_frames(path, frames)
    except VideoError as e:
        raise SampleError(f"sample {sample!r}: {e}") from None
    if any(im.size != (w, h) for im in images):
        got = next(im.size for im in images if im.size != (w, h))
        raise SampleError(
            f"sample {sample!r}: {path} has {got[1]}x{got[0]} frames but the manifest says {h}x{w}"
        )
    p, m, tps = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = image_grid(spec, np.array([h]), np.array([w]), frames=np.array([frames]))
    x = np.stack([_normalized(im, gh[0] * p, gw[0] * p) for im in images])  # (T, C, H, W)
    if len(x) % tps:
        x = np.concatenate([x, np.repeat(x[-1:], tps - len(x) % tps, axis=0)])
    grid = np.array([[1, gh[0], gw[0]]], dtype=np.int64)
    return [(_patchify(x[g : g + tps], p, m), grid) for g in range(0, len(x), tps)]


def read_wav(path: Path, sample: str) -> np.ndarray:
    """Mono float samples in [-1, 1] at 16 kHz."""
    try:
        with wave.open(str(path), "rb") as w:
            rate, channels, width, n = (
                w.getframerate(),
                w.getnchannels(),
                w.getsampwidth(),
                w.getnframes(),
            )
            raw = w.readframes(n)
    except (OSError, wave.Error, EOFError) as e:
        raise SampleError(f"sample {sample!r}: cannot read audio {path}: {e}") from None
    if width != 2 or rate != SAMPLE_RATE:
        raise SampleError(
            f"sample {sample!r}: {path} must be 16-bit PCM at {SAMPLE_RATE} Hz "
            f"(got {8 * width}-bit, {rate} Hz)"
        )
    audio = np.frombuffer(raw, dtype=np.int16).astype(np.float32) / 32768.0
    if channels > 1:
        audio = audio.reshape(-1, channels).mean(axis=1)
    if audio.size == 0:
        raise SampleError(f"sample {sample!r}: {path} holds no audio")
    return audio


def log_mel(audio: np.ndarray, spec: AudioSpec) -> tuple[torch.Tensor, list[int]]:
    mels, valid = log_mel_arrays(audio, spec)
    return torch.from_numpy(mels), valid


def log_mel_arrays(audio: np.ndarray, spec: AudioSpec) -> tuple[np.ndarray, list[int]]:
    """Whisper log-mel features of each chunk, padded to the chunk length: (chunks, n_mels,
    2 * positions), and the valid encoder positions of each chunk."""
    from transformers import WhisperFeatureExtractor

    hop = int(round(SAMPLE_RATE / (2 * spec.frames_per_second)))
    chunk = int(round(spec.chunk_seconds * SAMPLE_RATE))
    fx = WhisperFeatureExtractor(
        feature_size=spec.n_mels,
        sampling_rate=SAMPLE_RATE,
        hop_length=hop,
        chunk_length=int(spec.chunk_seconds),
        n_fft=400,
    )
    pieces = [audio[i : i + chunk] for i in range(0, len(audio), chunk)]
    feats = fx(pieces, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"]
    valid = [
        max(1, math.ceil(len(x) / SAMPLE_RATE * spec.frames_per_second - 1e-9)) for x in pieces
    ]
    return feats.astype(np.float32), valid


def manifest_line(rec: Record, codec: TextCodec) -> dict:
    """The manifest entry (sizes and token count) that describes a sample's files."""
    counts = {"image": len(rec.images), "audio": len(rec.audio), "video": len(rec.videos)}
    out: dict = {
        "id": rec.id,
        "text_tokens": text_tokens_of(rec.id, rec.text, rec.messages, counts, codec),
    }
    if rec.messages is not None:
        out["messages"] = rec.messages
    else:
        out["text"] = rec.text
    sizes = []
    for path in rec.images:
        with Image.open(path) as im:
            sizes.append([im.height, im.width])
    if sizes:
        out["image"] = sizes
    if rec.audio:
        out["audio"] = [round(len(read_wav(p, rec.id)) / SAMPLE_RATE, 4) for p in rec.audio]
    return out


def to_json_line(entry: dict) -> str:
    return json.dumps(entry, separators=(",", ":"))

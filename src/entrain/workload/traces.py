"""Synthetic traces shaped like public multimodal training sets.

Each generator draws sample shapes (image sizes and counts, audio lengths, video frames, text
tokens) from distributions calibrated to published statistics of the data set it imitates;
docs/analysis.md lists the sources. All draws are vectorized and chunked, so a trace of millions of
samples streams to disk without holding it in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np

from entrain.workload.columnar import ItemTable, Workload
from entrain.workload.manifest import write_manifest


def _lognormal(rng: np.random.Generator, median: float, sigma: float, n: int, lo: float, hi: float):
    return np.clip(rng.lognormal(np.log(median), sigma, n), lo, hi)


def _image_sizes(
    rng: np.random.Generator, n: int, median_side: float, sigma: float, lo: int, hi: int
) -> np.ndarray:
    """(n, 2) [height, width]: a long side from a lognormal and a common photo aspect ratio."""
    long_side = _lognormal(rng, median_side, sigma, n, lo, hi)
    aspect = rng.choice(
        [1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 1.25], size=n, p=[0.2, 0.35, 0.2, 0.15, 0.05, 0.05]
    )
    short = np.maximum(28, long_side / aspect)
    landscape = rng.random(n) < 0.7
    h = np.where(landscape, short, long_side)
    w = np.where(landscape, long_side, short)
    return np.stack([np.round(h), np.round(w)], axis=1)


def _items(
    rng: np.random.Generator, counts: np.ndarray, sizes: Callable[[int], np.ndarray]
) -> ItemTable:
    sample = np.repeat(np.arange(counts.shape[0], dtype=np.int64), counts)
    size = sizes(int(sample.shape[0])).astype(np.float64)
    # sizes are (k,) or (k, dims); a batch may draw no item of a kind (k = 0)
    width = size.shape[1] if size.ndim == 2 else 1
    return ItemTable(sample, size.reshape(sample.shape[0], width))


def _llava_pretrain(rng: np.random.Generator, n: int) -> dict:
    # LCS-558K: one image and a short BLIP caption behind a one-line instruction.
    caption = _lognormal(rng, 14, 0.35, n, 4, 80)
    instruction = rng.integers(6, 15, n)
    text = np.round(caption + instruction + 8)  # + chat template tokens
    images = _items(rng, np.ones(n, np.int64), lambda k: _image_sizes(rng, k, 500, 0.25, 100, 1600))
    return {"text": text, "image": images}


def _llava_instruct(rng: np.random.Generator, n: int) -> dict:
    # llava_v1_5_mix665k: ~6% text-only ShareGPT conversations (long), the rest one image
    # with multi-turn VQA / conversation / reasoning turns; 2048-token training limit.
    text_only = rng.random(n) < 0.062
    turns = np.minimum(1 + rng.geometric(0.35, n), 20)
    per_turn = _lognormal(rng, 45, 0.8, n, 4, 600)
    text = np.where(
        text_only, _lognormal(rng, 600, 0.8, n, 30, 2048), np.minimum(turns * per_turn + 12, 1600)
    )
    counts = (~text_only).astype(np.int64)
    # COCO (max side 640), GQA/VG (~500-800), TextVQA/OCR-VQA (up to ~1024)
    images = _items(rng, counts, lambda k: _image_sizes(rng, k, 620, 0.25, 150, 1600))
    return {"text": np.round(text), "image": images}


def _interleaved(rng: np.random.Generator, n: int) -> dict:
    # OBELICS (2.5 images, ~816 tokens a document) and MMC4 (5.7 images, ~425 tokens):
    # overdispersed image counts capped at 16, web images of every size.
    counts = np.minimum(rng.negative_binomial(1.5, 1.5 / (1.5 + 3.8), n), 16).astype(np.int64)
    text = _lognormal(rng, 420, 0.9, n, 16, 8192)
    images = _items(rng, counts, lambda k: _image_sizes(rng, k, 560, 0.55, 64, 4096))
    return {"text": np.round(text), "image": images}


def _omni(rng: np.random.Generator, n: int) -> dict:
    # A speech/vision instruction mix: text-only, image-only, audio-only and both.
    # Speech clip lengths follow LibriSpeech / Common Voice (median ~8 s) with a long tail of
    # long-form audio (podcast and lecture segments of minutes).
    kind = rng.choice(4, size=n, p=[0.15, 0.35, 0.35, 0.15])  # none, image, audio, both
    has_img = (kind == 1) | (kind == 3)
    has_aud = kind >= 2
    img_counts = has_img * (1 + (rng.random(n) < 0.2))
    aud_counts = has_aud * (1 + (rng.random(n) < 0.1))
    text = _lognormal(rng, 120, 0.9, n, 8, 4096)
    images = _items(
        rng, img_counts.astype(np.int64), lambda k: _image_sizes(rng, k, 640, 0.45, 64, 3000)
    )
    audio = _items(
        rng,
        aud_counts.astype(np.int64),
        lambda k: np.round(_lognormal(rng, 8.0, 1.0, k, 0.5, 300), 2),
    )
    return {"text": np.round(text), "image": images, "audio": audio}


def _video_sizes(rng: np.random.Generator, k: int) -> np.ndarray:
    # Clips sampled at 2 fps (Qwen2-VL), lengths from short clips to minutes (LLaVA-Video-178K
    # spans 0-3 min); 360p..1080p frames, some portrait.
    seconds = _lognormal(rng, 30, 0.9, k, 2, 600)
    frames = np.clip(2 * np.round(seconds), 4, 768)
    res = np.array([[360, 640], [480, 854], [720, 1280], [1080, 1920]])[
        rng.choice(4, k, p=[0.3, 0.3, 0.3, 0.1])
    ]
    portrait = rng.random(k) < 0.15
    res[portrait] = res[portrait][:, ::-1]
    return np.column_stack([frames, res])


def _video(rng: np.random.Generator, n: int) -> dict:
    kind = rng.choice(3, size=n, p=[0.05, 0.10, 0.85])  # text-only, image, video
    text = _lognormal(rng, 150, 0.8, n, 8, 4096)
    images = _items(
        rng, (kind == 1).astype(np.int64), lambda k: _image_sizes(rng, k, 640, 0.35, 100, 2000)
    )
    video = _items(rng, (kind == 2).astype(np.int64), lambda k: _video_sizes(rng, k))
    return {"text": np.round(text), "image": images, "video": video}


GENERATORS: dict[str, Callable[[np.random.Generator, int], dict]] = {
    "llava-pretrain": _llava_pretrain,
    "llava-instruct": _llava_instruct,
    "interleaved": _interleaved,
    "omni": _omni,
    "video": _video,
}


# The model preset each trace is meant to be analyzed with (benchmarks, tests, docs).
TRACE_MODELS: dict[str, str] = {
    "llava-pretrain": "llava-1.5-7b",
    "llava-instruct": "llava-1.5-7b",
    "interleaved": "qwen2-vl-7b",
    "omni": "omni-7b",
    "video": "qwen2-vl-7b",
}


def generate(kind: str, n: int, seed: int = 0, chunk_size: int = 100_000) -> Iterator[Workload]:
    """Chunks of a synthetic trace; the same (kind, n, seed) always gives the same samples."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown trace kind {kind!r}; choose one of {', '.join(GENERATORS)}")
    if n <= 0:
        raise ValueError(f"number of samples must be positive, got {n}")
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk_size):
        k = min(chunk_size, n - start)
        parts = GENERATORS[kind](rng, k)
        items = {m: t for m, t in parts.items() if m != "text"}
        yield Workload(
            ids=[f"{kind}-{start + i:08d}" for i in range(k)],
            text_tokens=parts["text"].astype(np.int64),
            items=items,
            line=np.arange(start + 1, start + k + 1, dtype=np.int64),
        )


def generate_workload(kind: str, n: int, seed: int = 0) -> Workload:
    """A whole synthetic trace in memory."""
    return Workload.concat(list(generate(kind, n, seed)))


def write_trace(
    kind: str,
    n: int,
    seed: int,
    path: str | os.PathLike,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Write a trace as a manifest; returns the number of samples written."""
    return write_manifest(path, generate(kind, n, seed), on_progress=on_progress)

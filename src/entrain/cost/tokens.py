"""Tokens from pixels and seconds: how many positions each encoder and the LLM see.

Each function is vectorized over all items of a batch and mirrors the preprocessing of the
model family it names, so token counts match what the real processor would produce.
"""

from __future__ import annotations

import numpy as np

from entrain.models.spec import AudioSpec, VisionSpec


def smart_resize(h: np.ndarray, w: np.ndarray, factor: int, min_pixels, max_pixels):
    """Qwen2-VL's resize rule: round each side to a multiple of `factor`, then scale the
    image (keeping its aspect) into [min_pixels, max_pixels]. Returns resized (h, w)."""
    h = np.asarray(h, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    hb = np.maximum(factor, np.round(h / factor) * factor)
    wb = np.maximum(factor, np.round(w / factor) * factor)
    area = h * w
    max_pixels = np.broadcast_to(np.asarray(max_pixels, np.float64), h.shape)
    over = hb * wb > max_pixels
    if over.any():
        beta = np.sqrt(area[over] / max_pixels[over])
        hb[over] = np.maximum(factor, np.floor(h[over] / beta / factor) * factor)
        wb[over] = np.maximum(factor, np.floor(w[over] / beta / factor) * factor)
    under = hb * wb < min_pixels
    if under.any():
        beta = np.sqrt(min_pixels / area[under])
        hb[under] = np.ceil(h[under] * beta / factor) * factor
        wb[under] = np.ceil(w[under] * beta / factor) * factor
    return hb.astype(np.int64), wb.astype(np.int64)


def image_grid(spec: VisionSpec, h: np.ndarray, w: np.ndarray, frames: np.ndarray | None = None):
    """Patch grid (rows, columns) of each image, or of each video frame when `frames` is
    given; two arrays of shape (I,).

    Video frames share a pixel budget (`video_total_pixels`), so the more frames a video has
    the smaller each is made, within the per-frame bounds, as qwen-vl-utils does.
    """
    p = spec.patch_size
    if spec.resize == "fixed":
        g = np.full(np.shape(h), spec.image_size // p, dtype=np.int64)
        return g, g.copy()
    if frames is None:
        lo, hi = spec.min_pixels, spec.max_pixels
    else:
        lo = spec.video_min_pixels
        budget = spec.video_total_pixels / np.asarray(frames, np.float64) * spec.temporal_patch_size
        hi = np.maximum(np.minimum(spec.video_max_pixels, budget), lo * 1.05)
    hb, wb = smart_resize(h, w, p * spec.merge_size, lo, hi)
    return hb // p, wb // p


def image_patches(spec: VisionSpec, h: np.ndarray, w: np.ndarray, frames: np.ndarray | None = None):
    """Patches per image, or per video frame when `frames` is given, shape (I,)."""
    gh, gw = image_grid(spec, h, w, frames)
    return gh * gw


def vision_grids(spec: VisionSpec, modality: str, size: np.ndarray) -> np.ndarray:
    """(I, 3) grid of each item in patches: temporal patches, rows, columns (Qwen2-VL's
    `grid_thw`; an image is one temporal patch, its frame repeated)."""
    size = np.asarray(size)
    if modality == "image":
        gh, gw = image_grid(spec, size[:, 0], size[:, 1])
        t = np.ones(len(size), dtype=np.int64)
    elif modality == "video":
        gh, gw = image_grid(spec, size[:, 1], size[:, 2], frames=size[:, 0])
        t = -(-size[:, 0].astype(np.int64) // spec.temporal_patch_size)
    else:
        raise ValueError(f"vision encoder {spec.name!r} cannot take modality {modality!r}")
    return np.stack([t, gh, gw], axis=1).astype(np.int64)


def vision_units(spec: VisionSpec, modality: str, size: np.ndarray):
    """Units of images or videos: (units per item, encoder tokens per unit, LLM tokens per unit),
    the last two with one entry per unit, items in order.

    A native-resolution image is one unit (its patches attend to each other); a video is one
    unit per temporal patch (Qwen2-VL attends within each group of `temporal_patch_size`
    frames), so the encoder can spread a long video over several microbatches.
    """
    extra = 1 if spec.cls_token else 0
    merge2 = spec.merge_size**2
    grid = vision_grids(spec, modality, size).reshape(-1, 3)
    n_units, patches = grid[:, 0], grid[:, 1] * grid[:, 2]
    return n_units, np.repeat(patches + extra, n_units), np.repeat(patches // merge2, n_units)


def audio_units(spec: AudioSpec, seconds: np.ndarray):
    """Units of audio clips, one per `chunk_seconds` chunk as Whisper encodes them; returns
    (units per item, encoder tokens per unit, LLM tokens per unit).

    With `pad_to_chunk` every chunk costs a full chunk on the encoder (Whisper pads), while
    the LLM only sees tokens for the real audio.
    """
    seconds = np.asarray(seconds, dtype=np.float64)
    n_units = np.maximum(1, np.ceil(seconds / spec.chunk_seconds - 1e-9).astype(np.int64))
    item = np.repeat(np.arange(len(seconds)), n_units)
    first = np.repeat(np.cumsum(n_units) - n_units, n_units)
    k = np.arange(item.shape[0]) - first
    length = np.minimum(spec.chunk_seconds, seconds[item] - k * spec.chunk_seconds)
    valid = np.ceil(length * spec.frames_per_second - 1e-9).astype(np.int64)
    full = int(round(spec.chunk_seconds * spec.frames_per_second))
    enc = np.full_like(valid, full) if spec.pad_to_chunk else valid
    return n_units, enc, -(-valid // spec.downsample)

"""Model specs read from a local Hugging Face model folder (its config.json), no torch.

A released checkpoint already says everything the cost model and the scheduler need: the
ViT's depth and width, patch and merge sizes, the LLM's shape and vocabulary, the image
processor's pixel bounds. Reading them here means `--model /path/to/Qwen2-VL-7B-Instruct`
needs no hand-written preset, and `analyze`, `plan` and `train` all see the same model.

Both config layouts in the wild are read: the one transformers 5 writes (the LLM under
`text_config`, rope settings under `rope_parameters`) and the original flat one of the
released Qwen2-VL folders (LLM fields at the top level, `rope_scaling`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from entrain.models.spec import AudioSpec, ModelSpec, TransformerSpec, VisionSpec

CONFIG = "config.json"
PREPROCESSOR = "preprocessor_config.json"

VISION_LANGUAGE = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
"""model_type -> the transformers class the runtime builds (vision tower + merger + LLM)."""

AUDIO = {"whisper": "WhisperForConditionalGeneration"}
"""model_type of folders whose audio encoder `--audio-from` can take."""


class HFConfigError(ValueError):
    """A model folder that cannot be used; the message names the file and the field."""


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder (a Hugging Face model folder, or meant to be one)."""
    return Path(path).is_dir()


def read_config(folder: str | os.PathLike, name: str = CONFIG) -> dict:
    """A folder's JSON config, with a one-line error naming the file when it is unusable."""
    path = Path(folder) / name
    if not path.is_file():
        raise HFConfigError(
            f"{path}: not found; a model folder needs the config.json of a Hugging Face "
            "checkpoint (and its *.safetensors weights)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HFConfigError(f"{path}: expected a JSON object at the top level")
    return data


def _supported(table: dict[str, str]) -> str:
    return ", ".join(f"{cls} ({t})" for t, cls in table.items())


@dataclass(frozen=True, kw_only=True)
class HFModel:
    """What the runtime needs beyond the spec to run a checkpoint as its authors did."""

    folder: Path
    model_type: str
    architecture: str
    """The transformers class that holds the whole model."""
    image_token_id: int | None
    video_token_id: int | None
    vision_start_token_id: int | None
    vision_end_token_id: int | None
    mrope_section: tuple[int, ...] | None
    """Qwen2-VL's 3-D rotary split of the head dimension (temporal, height, width)."""
    tokens_per_second: float | None
    """Qwen2.5-VL: temporal rotary positions per second of video."""
    tie_word_embeddings: bool


def _get(cfg: dict, path: Path, key: str, where: str, kind: type = int) -> Any:
    if key not in cfg:
        raise HFConfigError(f"{path}: missing {where}{key}")
    value = cfg[key]
    if kind is int and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise HFConfigError(f"{path}: {where}{key} must be a positive integer, got {value!r}")
    return value


def _text_config(cfg: dict) -> tuple[dict, str]:
    """The LLM's fields: `text_config` (transformers 5) or the top level (released folders)."""
    text = cfg.get("text_config")
    if isinstance(text, dict) and "hidden_size" in text:
        return text, "text_config."
    return cfg, ""


def _rope(text: dict, top: dict) -> tuple[dict, float]:
    rope = text.get("rope_parameters") or top.get("rope_parameters")
    rope = rope or text.get("rope_scaling") or top.get("rope_scaling") or {}
    theta = rope.get("rope_theta", text.get("rope_theta", top.get("rope_theta", 10000.0)))
    return rope, float(theta)


def model_type(folder: str | os.PathLike) -> str:
    cfg = read_config(folder)
    t = cfg.get("model_type")
    if not isinstance(t, str):
        raise HFConfigError(f"{Path(folder) / CONFIG}: missing model_type")
    return t


def hf_model(folder: str | os.PathLike) -> HFModel:
    """The architecture facts of a vision-language checkpoint; an unknown architecture is one
    error that lists what is supported."""
    folder = Path(folder)
    path = folder / CONFIG
    cfg = read_config(folder)
    mtype = cfg.get("model_type")
    if mtype not in VISION_LANGUAGE:
        arch = ", ".join(cfg.get("architectures") or []) or "no architectures listed"
        raise HFConfigError(
            f"{path}: model_type {mtype!r} ({arch}) is not supported; supported: "
            f"{_supported(VISION_LANGUAGE)}"
        )
    text, _ = _text_config(cfg)
    rope, _ = _rope(text, cfg)
    section = rope.get("mrope_section")
    if section is not None and (
        not isinstance(section, list) or not all(isinstance(s, int) for s in section)
    ):
        raise HFConfigError(f"{path}: mrope_section must be a list of integers, got {section!r}")
    vision = cfg.get("vision_config") or {}
    tps = vision.get("tokens_per_second", cfg.get("tokens_per_second"))
    return HFModel(
        folder=folder,
        model_type=mtype,
        architecture=VISION_LANGUAGE[mtype],
        image_token_id=cfg.get("image_token_id"),
        video_token_id=cfg.get("video_token_id"),
        vision_start_token_id=cfg.get("vision_start_token_id"),
        vision_end_token_id=cfg.get("vision_end_token_id"),
        mrope_section=tuple(section) if section else None,
        tokens_per_second=float(tps) if tps is not None else None,
        tie_word_embeddings=bool(
            cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
        ),
    )


def _llm_spec(cfg: dict, path: Path) -> TransformerSpec:
    text, where = _text_config(cfg)
    return TransformerSpec(
        hidden_size=_get(text, path, "hidden_size", where),
        num_hidden_layers=_get(text, path, "num_hidden_layers", where),
        num_attention_heads=_get(text, path, "num_attention_heads", where),
        num_key_value_heads=text.get("num_key_value_heads"),
        intermediate_size=_get(text, path, "intermediate_size", where),
        vocab_size=_get(text, path, "vocab_size", where),
    )


def _pixel_bounds(folder: Path) -> tuple[int, int]:
    """The image processor's [min_pixels, max_pixels] (its defaults when it says none)."""
    lo, hi = 56 * 56, 28 * 28 * 1280
    if not (folder / PREPROCESSOR).is_file():
        return lo, hi
    pre = read_config(folder, PREPROCESSOR)
    size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
    lo = pre.get("min_pixels", size.get("shortest_edge", size.get("min_pixels", lo)))
    hi = pre.get("max_pixels", size.get("longest_edge", size.get("max_pixels", hi)))
    for name, v in (("min_pixels", lo), ("max_pixels", hi)):
        if not isinstance(v, int) or v <= 0:
            raise HFConfigError(f"{folder / PREPROCESSOR}: {name} must be a positive integer")
    return lo, hi


def _vision_spec(cfg: dict, folder: Path, llm_hidden: int) -> VisionSpec:
    path = folder / CONFIG
    v = cfg.get("vision_config")
    if not isinstance(v, dict):
        raise HFConfigError(f"{path}: missing vision_config")
    w = "vision_config."
    if cfg["model_type"] == "qwen2_vl":
        width = _get(v, path, "embed_dim", w)
        enc = TransformerSpec(
            hidden_size=width,
            num_hidden_layers=_get(v, path, "depth", w),
            num_attention_heads=_get(v, path, "num_heads", w),
            intermediate_size=int(width * v.get("mlp_ratio", 4)),
            gated_mlp=False,
            causal=False,
        )
    else:  # qwen2_5_vl: gated (SwiGLU) MLP, RMSNorm, window attention in most blocks
        width = _get(v, path, "hidden_size", w)
        enc = TransformerSpec(
            hidden_size=width,
            num_hidden_layers=_get(v, path, "depth", w),
            num_attention_heads=_get(v, path, "num_heads", w),
            intermediate_size=_get(v, path, "intermediate_size", w),
            gated_mlp=True,
            causal=False,
        )
    merge = v.get("spatial_merge_size", 2)
    lo, hi = _pixel_bounds(folder)
    return VisionSpec(
        encoder=enc,
        patch_size=v.get("patch_size", 14),
        resize="dynamic",
        min_pixels=lo,
        max_pixels=hi,
        merge_size=merge,
        temporal_patch_size=v.get("temporal_patch_size", 2),
        num_channels=v.get("in_channels", v.get("in_chans", 3)),
        projector_hidden=width * merge * merge,
    )


def audio_spec(folder: str | os.PathLike) -> AudioSpec:
    """The audio encoder of a Whisper folder. Its projector into the LLM is new (trained from
    a seeded random start): no released checkpoint pairs this encoder with the
    vision-language model's LLM."""
    folder = Path(folder)
    path = folder / CONFIG
    cfg = read_config(folder)
    mtype = cfg.get("model_type")
    if mtype not in AUDIO:
        raise HFConfigError(
            f"{path}: model_type {mtype!r} has no audio encoder Entrain can load; supported: "
            f"{_supported(AUDIO)}"
        )
    a, w = cfg, ""
    positions = _get(a, path, "max_source_positions", w)
    return AudioSpec(
        encoder=TransformerSpec(
            hidden_size=_get(a, path, "d_model", w),
            num_hidden_layers=_get(a, path, "encoder_layers", w),
            num_attention_heads=_get(a, path, "encoder_attention_heads", w),
            intermediate_size=_get(a, path, "encoder_ffn_dim", w),
            gated_mlp=False,
            causal=False,
        ),
        n_mels=a.get("num_mel_bins", 80),
        frames_per_second=max(1, positions // 30),
        chunk_seconds=30.0,
        pad_to_chunk=True,
        downsample=2,
        projector_hidden=_get(a, path, "d_model", w) * 2,
    )


def spec_from_folder(
    folder: str | os.PathLike, audio_from: str | os.PathLike | None = None
) -> ModelSpec:
    """A ModelSpec for a vision-language checkpoint (and an audio encoder from another
    folder, for the omni case)."""
    folder = Path(folder)
    info = hf_model(folder)  # checks the architecture first: one clear error
    cfg = read_config(folder)
    llm = _llm_spec(cfg, folder / CONFIG)
    encoders: list = [_vision_spec(cfg, folder, llm.hidden_size)]
    if audio_from is not None:
        encoders.append(audio_spec(audio_from))
    del info
    return ModelSpec(name=folder.name, llm=llm, encoders=tuple(encoders))

"""Loading model specs from a preset name or a YAML/JSON file into the same dataclasses."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import yaml

from entrain.models.presets import PRESETS
from entrain.models.spec import AudioSpec, ModelSpec, TransformerSpec, VisionSpec

_ENCODER_TYPES: dict[str, type] = {"vision": VisionSpec, "audio": AudioSpec}


class SpecError(ValueError):
    """A model spec file or name that cannot be used; the message says where and why."""


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    kwargs = dict(data)
    if "encoder" in kwargs:
        kwargs["encoder"] = _build(TransformerSpec, kwargs["encoder"], f"{where}.encoder")
    if "modalities" in kwargs:
        kwargs["modalities"] = tuple(kwargs["modalities"])
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise SpecError(f"{where}: {e}") from None
    except ValueError as e:
        raise SpecError(f"{where}: {e}") from None


def spec_from_dict(data: dict, where: str = "spec") -> ModelSpec:
    """Build a ModelSpec from plain data (the inverse of `spec_to_dict`)."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping at the top level")
    data = dict(data)
    encoders = []
    for i, enc in enumerate(data.pop("encoders", []) or []):
        if not isinstance(enc, dict) or enc.get("type") not in _ENCODER_TYPES:
            raise SpecError(f"{where}.encoders[{i}]: needs 'type' of {sorted(_ENCODER_TYPES)}")
        enc = dict(enc)
        cls = _ENCODER_TYPES[enc.pop("type")]
        encoders.append(_build(cls, enc, f"{where}.encoders[{i}]"))
    if "llm" not in data:
        raise SpecError(f"{where}: missing 'llm'")
    data["llm"] = _build(TransformerSpec, data["llm"], f"{where}.llm")
    data.setdefault("name", "custom")
    try:
        return _build_model(data, encoders, where)
    except ValueError as e:
        raise SpecError(f"{where}: {e}") from None


def _build_model(data: dict, encoders: list, where: str) -> ModelSpec:
    known = {f.name for f in dataclasses.fields(ModelSpec)} - {"encoders"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}")
    return ModelSpec(encoders=tuple(encoders), **data)


def spec_to_dict(spec: ModelSpec) -> dict:
    """Plain data for a spec, loadable by `spec_from_dict` (and writable as YAML/JSON)."""
    out = dataclasses.asdict(spec)
    out["encoders"] = []
    for enc in spec.encoders:
        d = dataclasses.asdict(enc)
        d["modalities"] = list(d["modalities"])
        d["type"] = "vision" if isinstance(enc, VisionSpec) else "audio"
        out["encoders"].append(d)
    return out


def load_spec(name_or_path: str | os.PathLike) -> ModelSpec:
    """A preset by name, or a spec from a .yaml/.yml/.json file."""
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]()
    path = Path(key)
    if not path.exists():
        raise SpecError(
            f"unknown model {key!r}: not a preset ({', '.join(PRESETS)}) and no such file"
        )
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot parse ({e})") from None
    return spec_from_dict(data, where=str(path))

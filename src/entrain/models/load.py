"""Loading model specs from a preset name or a YAML/JSON file into the same dataclasses."""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from entrain.models.hf import spec_from_folder
from entrain.models.presets import PRESETS
from entrain.models.spec import AudioSpec, ModelSpec, TransformerSpec, VisionSpec

_ENCODER_TYPES: dict[str, type] = {"vision": VisionSpec, "audio": AudioSpec}


class SpecError(ValueError):
    """A model spec file or name that cannot be used; the message says where and why."""


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a plain value (from YAML/JSON) fits a field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return value in args
    if origin in (types.UnionType, typing.Union):
        return any(_type_ok(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, list | tuple) and all(_type_ok(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # nested specs are checked by their own _build


def _build(cls: type, data: Any, where: str, **nested: Any) -> Any:
    """`cls(**data)` with every key known and every value of the right type; `nested`
    holds fields already built (sub-specs)."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints), key=str)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; known: {sorted(hints)}")
    kwargs = dict(data)
    for key, value in kwargs.items():
        if key not in nested and not _type_ok(value, hints[key]):
            raise SpecError(f"{where}.{key}: {value!r} is not a valid {_describe(hints[key])}")
    kwargs.update(nested)
    if "modalities" in kwargs:
        kwargs["modalities"] = tuple(kwargs["modalities"])
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise SpecError(f"{where}: {e}") from None
    except ValueError as e:
        raise SpecError(f"{where}: {e}") from None


def _describe(hint: Any) -> str:
    name = getattr(hint, "__name__", None)
    return name if name and not typing.get_args(hint) else str(hint).replace("typing.", "")


def spec_from_dict(data: dict, where: str = "spec") -> ModelSpec:
    """Build a ModelSpec from plain data (the inverse of `spec_to_dict`)."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a mapping at the top level")
    data = dict(data)
    raw_encoders = data.get("encoders") or []
    if not isinstance(raw_encoders, list):
        raise SpecError(f"{where}.encoders: expected a list of encoders")
    encoders = []
    for i, enc in enumerate(raw_encoders):
        at = f"{where}.encoders[{i}]"
        kind = enc.get("type") if isinstance(enc, dict) else None
        if not isinstance(kind, str) or kind not in _ENCODER_TYPES:
            raise SpecError(f"{at}: needs 'type', one of {sorted(_ENCODER_TYPES)}")
        enc = {k: v for k, v in enc.items() if k != "type"}
        if "encoder" not in enc:
            raise SpecError(f"{at}: missing 'encoder' (its transformer shape)")
        stack = _build(TransformerSpec, enc["encoder"], f"{at}.encoder")
        encoders.append(_build(_ENCODER_TYPES[kind], enc, at, encoder=stack))
    if "llm" not in data:
        raise SpecError(f"{where}: missing 'llm'")
    llm = _build(TransformerSpec, data["llm"], f"{where}.llm")
    data.setdefault("name", "custom")
    return _build(ModelSpec, data, where, llm=llm, encoders=tuple(encoders))


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
    """A preset by name, a spec from a .yaml/.yml/.json file, or the spec of a Hugging Face
    model folder (read from its config.json)."""
    key = str(name_or_path)
    if key in PRESETS:
        return PRESETS[key]()
    path = Path(key)
    if path.is_dir():
        try:
            return spec_from_folder(path)
        except ValueError as e:
            raise SpecError(str(e)) from None
    if not path.exists():
        raise SpecError(
            f"unknown model {key!r}: not a preset ({', '.join(PRESETS)}), and no such file or "
            "model folder"
        )
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SpecError(f"{path}: cannot parse ({e})") from None
    return spec_from_dict(data, where=str(path))


def apply_freeze(spec: ModelSpec, frozen: tuple[str, ...] | list[str]) -> ModelSpec:
    """The spec with the named modules frozen (a frozen encoder's projector still trains)."""
    unknown = set(frozen) - set(spec.modules)
    if unknown:
        raise SpecError(
            f"--freeze {','.join(sorted(unknown))}: model {spec.name!r} has no such module "
            f"(its modules: {', '.join(spec.modules)})"
        )
    encoders = tuple(
        dataclasses.replace(e, frozen=e.frozen or e.name in frozen) for e in spec.encoders
    )
    return dataclasses.replace(
        spec, encoders=encoders, llm_frozen=spec.llm_frozen or "llm" in frozen
    )


def run_spec(
    model: str, audio_from: str | None = None, freeze: tuple[str, ...] | list[str] = ()
) -> ModelSpec:
    """The spec a training run uses: `--model` (preset, spec file or model folder), an audio
    encoder from `--audio-from`, modules frozen by `--freeze`."""
    if audio_from is not None:
        if not Path(model).is_dir():
            raise SpecError("--audio-from needs --model to be a Hugging Face model folder")
        try:
            spec = spec_from_folder(model, audio_from)
        except ValueError as e:
            raise SpecError(str(e)) from None
    else:
        spec = load_spec(model)
    return apply_freeze(spec, tuple(freeze))

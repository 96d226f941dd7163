"""Model specs and presets (plain dataclasses, no torch)."""

from entrain.models.load import SpecError, load_spec, spec_from_dict, spec_to_dict
from entrain.models.presets import PRESETS
from entrain.models.spec import AudioSpec, EncoderSpec, ModelSpec, TransformerSpec, VisionSpec

__all__ = [
    "PRESETS",
    "AudioSpec",
    "EncoderSpec",
    "ModelSpec",
    "SpecError",
    "TransformerSpec",
    "VisionSpec",
    "load_spec",
    "spec_from_dict",
    "spec_to_dict",
]

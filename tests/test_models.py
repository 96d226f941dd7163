"""Model specs: presets, dict/YAML/JSON round trips, and the errors of a bad spec."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from entrain.models import (
    PRESETS,
    AudioSpec,
    ModelSpec,
    SpecError,
    TransformerSpec,
    VisionSpec,
    load_spec,
    spec_from_dict,
    spec_to_dict,
)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_loads_and_round_trips(tmp_path, name):
    spec = load_spec(name)
    assert isinstance(spec, ModelSpec)
    assert spec.name == name
    assert spec == PRESETS[name]()

    d = spec_to_dict(spec)
    assert json.loads(json.dumps(d)) == d  # plain JSON data: lists, not tuples
    assert spec_to_dict(spec_from_dict(copy.deepcopy(d))) == d
    assert spec_from_dict(copy.deepcopy(d)) == spec

    y = tmp_path / f"{name}.yaml"
    y.write_text(yaml.safe_dump(d), encoding="utf-8")
    j = tmp_path / f"{name}.json"
    j.write_text(json.dumps(d, indent=1), encoding="utf-8")
    yml = tmp_path / f"{name}.yml"
    yml.write_text(yaml.safe_dump(d), encoding="utf-8")
    for path in (y, j, yml, str(y)):
        loaded = load_spec(path)
        assert loaded == spec
        assert spec_to_dict(loaded) == d

    assert spec.modules[-1] == "llm"
    assert spec.modules == tuple(e.name for e in spec.encoders) + ("llm",)
    assert len(set(spec.modules)) == len(spec.modules)
    for e in spec.encoders:
        assert isinstance(e, VisionSpec | AudioSpec)
        assert isinstance(e.modalities, tuple)
        for m in e.modalities:
            assert spec.encoder_for(m) is e


def test_presets_are_fresh_copies():
    a, b = PRESETS["tiny"](), PRESETS["tiny"]()
    assert a == b and a is not b
    a.llm.num_hidden_layers = 99
    assert PRESETS["tiny"]().llm.num_hidden_layers != 99
    assert load_spec("tiny") == b


def test_preset_facts():
    llava = PRESETS["llava-1.5-7b"]()
    assert llava.modules == ("vision", "llm")
    assert llava.encoders[0].frozen and llava.encoders[0].resize == "fixed"
    assert llava.encoder_for("audio") is None
    omni = PRESETS["omni-7b"]()
    assert omni.modules == ("vision", "audio", "llm")
    assert isinstance(omni.encoder_for("audio"), AudioSpec)
    assert isinstance(omni.encoder_for("video"), VisionSpec)


def test_spec_from_dict_defaults():
    spec = spec_from_dict(
        {
            "llm": {
                "hidden_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "intermediate_size": 128,
            }
        }
    )
    assert spec.name == "custom"
    assert spec.encoders == ()
    assert spec.modules == ("llm",)
    assert spec.llm.num_key_value_heads == 4
    assert spec.llm.head_dim == 16


# ------------------------------------------------------------------------------------ errors


def tiny_dict() -> dict:
    return spec_to_dict(PRESETS["tiny"]())


def _unknown_encoder_key(d):
    d["encoders"][0]["patch_sise"] = 14


def _unknown_inner_key(d):
    d["encoders"][1]["encoder"]["hidden_sise"] = 14


def _unknown_llm_key(d):
    d["llm"]["num_layers"] = 3


def _unknown_top_key(d):
    d["vision_tower"] = {}


def _no_llm(d):
    del d["llm"]


def _no_type(d):
    del d["encoders"][0]["type"]


def _bad_type(d):
    d["encoders"][1]["type"] = "speech"


def _not_divisible(d):
    d["llm"]["hidden_size"] = 130


def _encoder_not_divisible(d):
    d["encoders"][0]["encoder"]["num_attention_heads"] = 3


def _same_modality(d):
    d["encoders"][1]["modalities"] = ["audio", "image"]


def _same_name(d):
    d["encoders"][1]["name"] = "vision"


def _named_llm(d):
    d["encoders"][1]["name"] = "llm"


def _missing_llm_field(d):
    del d["llm"]["intermediate_size"]


def _negative(d):
    d["llm"]["num_hidden_layers"] = -2


def _bad_resize(d):
    d["encoders"][0]["resize"] = "crop"


def _min_over_max(d):
    d["encoders"][0]["min_pixels"] = 10**9


def _llm_not_mapping(d):
    d["llm"] = [1, 2]


def _kv_heads(d):
    d["llm"]["num_key_value_heads"] = 3


SPEC_ERRORS = [
    (_unknown_encoder_key, ["encoders[0]", "patch_sise"]),
    (_unknown_inner_key, ["encoders[1].encoder", "hidden_sise"]),
    (_unknown_llm_key, ["llm", "num_layers"]),
    (_unknown_top_key, ["vision_tower"]),
    (_no_llm, ["missing 'llm'"]),
    (_no_type, ["encoders[0]", "type"]),
    (_bad_type, ["encoders[1]", "type"]),
    (_not_divisible, ["130", "divisible"]),
    (_encoder_not_divisible, ["encoders[0]", "divisible"]),
    (_same_modality, ["'image'", "vision", "audio"]),
    (_same_name, ["unique", "['vision', 'vision']"]),
    (_named_llm, ["not 'llm'", "got ['vision', 'llm']"]),
    (_missing_llm_field, ["llm", "intermediate_size"]),
    (_negative, ["num_hidden_layers", "-2"]),
    (_bad_resize, ["resize", "crop"]),
    (_min_over_max, ["min_pixels"]),
    (_llm_not_mapping, ["llm", "mapping"]),
    (_kv_heads, ["num_key_value_heads"]),
]


@pytest.mark.parametrize("mutate, words", SPEC_ERRORS, ids=[f.__name__[1:] for f, _ in SPEC_ERRORS])
def test_bad_spec_dict(mutate, words):
    d = tiny_dict()
    mutate(d)
    with pytest.raises(SpecError) as e:
        spec_from_dict(d)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_bad_spec_file_names_the_file_and_key(tmp_path, suffix):
    d = tiny_dict()
    d["encoders"][0]["bogus_key"] = 1
    path = tmp_path / f"bad{suffix}"
    path.write_text(json.dumps(d) if suffix == ".json" else yaml.safe_dump(d), encoding="utf-8")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(path) in str(e.value)
    assert "bogus_key" in str(e.value)


@pytest.mark.parametrize(
    "suffix, text, words",
    [
        (".json", '{"llm": ', ["cannot parse"]),
        (".yaml", "llm: [1, 2\n", ["cannot parse"]),
        (".yaml", "- 1\n- 2\n", ["mapping"]),
        (".yaml", "", ["mapping"]),
    ],
)
def test_unparsable_spec_file(tmp_path, suffix, text, words):
    path = tmp_path / f"spec{suffix}"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_unknown_preset_name(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec("llava-2-13b")
    msg = str(e.value)
    assert "llava-2-13b" in msg
    assert "preset" in msg and "no such file" in msg
    for name in PRESETS:  # the message lists what would have worked
        assert name in msg
    with pytest.raises(SpecError):
        load_spec(tmp_path / "missing.yaml")


def test_spec_error_is_a_value_error():
    assert issubclass(SpecError, ValueError)


def test_dataclass_validation():
    with pytest.raises(ValueError, match="divisible"):
        TransformerSpec(
            hidden_size=10, num_hidden_layers=1, num_attention_heads=3, intermediate_size=4
        )
    with pytest.raises(ValueError, match="hidden_size"):
        TransformerSpec(
            hidden_size=0, num_hidden_layers=1, num_attention_heads=1, intermediate_size=4
        )
    with pytest.raises(ValueError, match="num_hidden_layers"):
        TransformerSpec(
            hidden_size=8, num_hidden_layers=True, num_attention_heads=1, intermediate_size=4
        )


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d["encoders"][0].__setitem__("type", ["vision"]),
        lambda d: d["encoders"][1].__setitem__("modalities", 5),
        lambda d: d.__setitem__("encoders", 5),
    ],
    ids=["type is a list", "modalities is an int", "encoders is an int"],
)
def test_malformed_spec_types_are_spec_errors(mutate):
    d = tiny_dict()
    mutate(d)
    with pytest.raises(SpecError):
        spec_from_dict(d)

"""Hugging Face model folders in and out: the spec from config.json, the runtime's function
equal to the transformers model's own (M-RoPE positions, placeholders, pixel values, loss),
rank-local loading, and one clear line for every kind of bad folder."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_models import tiny_vl, transformers_loss

from entrain.data.codec import HFCodec
from entrain.data.sequence import Item, build_tokens
from entrain.models.hf import HFConfigError, hf_model, spec_from_folder
from entrain.models.load import SpecError, load_spec
from entrain.runtime.demo_data import make_demo_data
from entrain.runtime.hf_load import WeightsError
from entrain.runtime.reference import reference_params
from entrain.runtime.setup import TrainConfig
from entrain.runtime.source import check_weights, model_source

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def vl(tmp_path_factory) -> Path:
    return tiny_vl(tmp_path_factory.mktemp("qwen2vl") / "Qwen2-VL-tiny")


@pytest.fixture(scope="module")
def vl25(tmp_path_factory) -> Path:
    return tiny_vl(tmp_path_factory.mktemp("qwen25vl") / "m", kind="qwen2_5_vl", tie=True)


def _data(model: Path, root: Path, n: int = 12, seed: int = 1) -> Path:
    return make_demo_data(
        root, n, seed=seed, audio_share=0.0, codec=HFCodec(model, hf_model(model))
    )


# ------------------------------------------------------------------------------ the spec


def test_spec_from_a_qwen2_vl_folder(vl):
    spec = load_spec(vl)  # a folder is a model, for analyze and plan as for train
    cfg = json.loads((vl / "config.json").read_text())
    assert spec.llm.hidden_size == cfg["text_config"]["hidden_size"] == 64
    assert spec.llm.num_hidden_layers == 2 and spec.llm.num_key_value_heads == 2
    assert spec.llm.vocab_size == cfg["text_config"]["vocab_size"]
    (vision,) = spec.encoders
    assert (vision.encoder.hidden_size, vision.encoder.num_hidden_layers) == (32, 2)
    assert vision.encoder.intermediate_size == 64 and not vision.encoder.gated_mlp
    assert (vision.patch_size, vision.merge_size, vision.temporal_patch_size) == (14, 2, 2)
    assert (vision.min_pixels, vision.max_pixels) == (28 * 28 * 4, 28 * 28 * 64)  # preprocessor
    info = hf_model(vl)
    assert info.mrope_section == (2, 3, 3) and not info.tie_word_embeddings


def test_spec_from_a_released_style_flat_config(tmp_path):
    """Released Qwen2-VL folders keep the LLM's fields at the top level and rope_scaling."""
    flat = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "model_type": "qwen2_vl",
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_attention_heads": 28,
        "num_hidden_layers": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "image_token_id": 151655,
        "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16},
    }
    (tmp_path / "config.json").write_text(json.dumps(flat))
    spec = spec_from_folder(tmp_path)
    assert spec.llm.hidden_size == 3584 and spec.llm.num_key_value_heads == 4
    assert spec.encoders[0].encoder.intermediate_size == 5120
    assert hf_model(tmp_path).mrope_section == (16, 24, 24)
    preset = load_spec("qwen2-vl-7b")  # the hand-written preset says the same
    assert spec.llm == preset.llm
    assert spec.encoders[0].encoder == preset.encoders[0].encoder


def test_qwen2_5_vl_spec_has_a_gated_vit(vl25):
    spec = spec_from_folder(vl25)
    assert spec.encoders[0].encoder.gated_mlp
    assert hf_model(vl25).tie_word_embeddings


def test_unknown_architecture_and_missing_config_are_one_line(tmp_path):
    with pytest.raises(HFConfigError, match=r"config.json: not found"):
        spec_from_folder(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "mamba", "architectures": ["MambaForCausalLM"]})
    )
    with pytest.raises(HFConfigError) as e:
        spec_from_folder(tmp_path)
    msg = str(e.value)
    assert (
        "'mamba'" in msg and "MambaForCausalLM" in msg and "Qwen2VLForConditionalGeneration" in msg
    )
    assert "\n" not in msg
    with pytest.raises(SpecError):  # through load_spec, as analyze and plan call it
        load_spec(tmp_path)


# ------------------------------------------------------------------ fidelity to the model


def test_mrope_positions_equal_transformers_get_rope_index(vl):
    """Images of different grids between text runs, and a sample with images only."""
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(vl)
    codec = HFCodec(vl, hf_model(vl))
    rng = np.random.default_rng(0)
    for text in ("a photo <image> of a cat <image> on a mat", "<image><image>", "describe"):
        n = text.count("<image>")
        grids = [(1, int(rng.integers(1, 5)), int(rng.integers(1, 5))) for _ in range(n)]
        items = {"image": [Item(t * h * w, (t, h, w)) for t, h, w in grids]} if n else {}
        tok = build_tokens("s", text, items, codec, rope="mrope")
        ids = torch.from_numpy(tok.input_ids)[None]
        if n:
            thw = torch.tensor([[t, 2 * h, 2 * w] for t, h, w in grids])  # patches, before merge
            mm = (ids == codec.pad_ids["image"]).int()
            want, _ = model.model.get_rope_index(ids, mm, image_grid_thw=thw)
            assert np.array_equal(tok.positions, want[:, 0].numpy()), text
        else:
            assert np.array_equal(tok.positions, np.tile(np.arange(ids.shape[1]), (3, 1)))


def test_pixel_values_equal_the_image_processor(vl, tmp_path):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from entrain.runtime.inputs import image_patches

    spec = spec_from_folder(vl).encoders[0]
    pre = json.loads((vl / "preprocessor_config.json").read_text())
    proc = Qwen2VLImageProcessorPil(**{k: v for k, v in pre.items() if k != "image_processor_type"})
    rng = np.random.default_rng(3)
    for h, w in ((40, 200), (150, 90), (28, 28)):
        path = tmp_path / f"{h}x{w}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        patches, grid = image_patches(path, spec, "s")
        want = proc(images=Image.open(path), return_tensors="pt")
        assert torch.equal(grid, want["image_grid_thw"])
        assert torch.allclose(patches, want["pixel_values"], atol=1e-5), (h, w)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_loss_equals_the_transformers_model(kind, vl, vl25, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    folder, cls = (
        (vl, Qwen2VLForConditionalGeneration)
        if kind == "qwen2_vl"
        else (vl25, Qwen2_5_VLForConditionalGeneration)
    )
    data = _data(folder, tmp_path / "data")
    cfg = TrainConfig(data=str(data), model=str(folder), steps=1, global_batch=8, microbatches=2)
    losses: list[float] = []
    reference_params(cfg, losses=losses)
    want = transformers_loss(cls, folder, cfg)
    assert losses[0] == pytest.approx(want, rel=1e-5)


def test_frozen_qwen2_5_vision_sends_trunk_states_in_image_order(vl25, tmp_path):
    """A frozen encoder's merger runs on the LLM side: the window-ordered ViT's states must
    reach it in image order, or the loss changes."""
    data = _data(vl25, tmp_path / "data")
    base = TrainConfig(data=str(data), model=str(vl25), steps=1, global_batch=8, microbatches=2)
    trained, frozen = [], []
    reference_params(base, losses=trained)
    reference_params(dataclasses.replace(base, freeze=("vision",)), losses=frozen)
    assert frozen[0] == pytest.approx(trained[0], rel=1e-7)


# ---------------------------------------------------------------------- loading, locally


def test_a_rank_materializes_only_its_stage(vl, tmp_path):
    source = model_source(str(vl), 0)
    stage, named = source.llm_stage(1, 2, torch.device("cpu"))
    assert all(k.startswith(("model.layers.1.", "model.norm", "lm_head")) for k in named)
    assert not any(k.startswith("model.layers.0.") for k in named)
    meta = [n for n, p in source.model.named_parameters() if p.is_meta]
    assert any(n.startswith("model.visual.") for n in meta)  # never read on this rank
    from safetensors.torch import load_file

    disk = load_file(vl / "model.safetensors")
    assert all(torch.equal(p.detach(), disk[k]) for k, p in named.items())


def test_tied_embeddings_are_one_tensor_on_one_stage_and_a_copy_on_two(vl25):
    source = model_source(str(vl25), 0)
    whole, named = source.llm_stage(0, 1, torch.device("cpu"))
    assert whole.head.weight is whole.embed.weight
    assert "lm_head.weight" not in named and source.tied_key in named
    last, named_last = model_source(str(vl25), 0).llm_stage(1, 2, torch.device("cpu"))
    assert source.tied_key in named_last
    assert torch.equal(last.head.weight, whole.embed.weight)


def _break(folder: Path, tmp: Path, how: str) -> Path:
    bad = tmp / how
    shutil.copytree(folder, bad)
    if how == "no-config":
        (bad / "config.json").unlink()
    elif how == "truncated":
        shard = bad / "model.safetensors"
        shard.write_bytes(shard.read_bytes()[:-64])
    elif how == "missing-shard":
        (bad / "model.safetensors").unlink()
    elif how == "shape":
        cfg = json.loads((bad / "config.json").read_text())
        cfg["text_config"]["intermediate_size"] = 96
        (bad / "config.json").write_text(json.dumps(cfg))
    elif how == "unknown":
        cfg = json.loads((bad / "config.json").read_text())
        cfg["model_type"] = "llava_next"
        (bad / "config.json").write_text(json.dumps(cfg))
    return bad


@pytest.mark.parametrize(
    "how, expect",
    [
        ("no-config", r"config\.json: not found"),
        ("truncated", r"model\.safetensors: cannot read it as safetensors .*truncated"),
        ("missing-shard", r"no \*\.safetensors weights"),
        ("shape", r"model\.safetensors: tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape"),
        ("unknown", r"model_type 'llava_next' .* not supported; supported: Qwen2VL"),
    ],
)
def test_bad_folders_fail_in_one_line_before_any_rank_starts(vl, tmp_path, how, expect):
    bad = _break(vl, tmp_path, how)
    with pytest.raises((WeightsError, HFConfigError)) as e:
        check_weights(model_source(str(bad), 0))
    assert "\n" not in str(e.value)
    assert __import__("re").search(expect, str(e.value)), str(e.value)


def test_missing_shard_of_an_index_is_named(tmp_path):
    folder = tiny_vl(tmp_path / "sharded", shards=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    gone = sorted(set(index["weight_map"].values()))[1]
    (folder / gone).unlink()
    with pytest.raises(
        WeightsError,
        match=rf"model.safetensors.index.json: tensor \S+ is in shard {gone}, which is missing",
    ):
        model_source(str(folder), 0)


MEASURE = """
import gc, json, sys, torch
from entrain.runtime.source import model_source

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024

source = model_source(sys.argv[1], 0)
source.model  # the skeleton: parameters on meta
gc.collect(); before = anon()
stage, named = source.llm_stage(int(sys.argv[2]), int(sys.argv[3]), torch.device("cpu"))
gc.collect()
print(json.dumps({"grew": anon() - before, "held": sum(p.numel() * 4 for p in named.values())}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc")
def test_half_of_a_two_stage_llm_allocates_half_the_llm(tmp_path):
    """Measured in fresh processes: the anonymous memory a rank's LLM stage adds."""
    import subprocess
    import sys

    folder = tiny_vl(tmp_path / "m", layers=8, hidden=512)  # ~77 MB of LLM in fp32

    def grew(stage: int, stages: int) -> dict:
        out = subprocess.run(
            [sys.executable, "-c", MEASURE, str(folder), str(stage), str(stages)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    whole, half = grew(0, 1), grew(1, 2)
    assert whole["held"] > 70e6
    assert half["grew"] == pytest.approx(half["held"], rel=0.1)  # what it holds, no more
    assert 0.4 < half["grew"] / whole["grew"] < 0.6

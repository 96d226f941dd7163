"""Training a Hugging Face model folder for real under torchrun (gloo, CPU), and exporting
it: the loss of the first step is the transformers model's own, parameters after a step
equal the single-process reference for every policy, an export with lr 0 is the source
folder bit for bit, and a trained export loads in transformers with the logits Entrain
computes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hf_models import tiny_vl, transformers_loss
from runtime_helpers import assert_matches_reference, train
from safetensors.torch import load_file

from entrain.data.codec import HFCodec
from entrain.models.hf import hf_model
from entrain.runtime.demo_data import make_demo_data
from entrain.runtime.setup import TrainConfig
from entrain.schedule import POLICIES

pytestmark = [pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore::UserWarning")]
STEP = ["--steps", "1", "--global-batch", "8", "--microbatches", "2"]


@pytest.fixture(scope="module")
def vl(tmp_path_factory) -> Path:
    return tiny_vl(tmp_path_factory.mktemp("vl") / "Qwen2-VL-tiny")


@pytest.fixture(scope="module")
def data(vl, tmp_path_factory) -> Path:
    """Conversations (a user turn with the images, the caption as the answer): the loss is
    taken on the assistant's tokens only, as in SFT."""
    codec = HFCodec(vl, hf_model(vl))
    root = tmp_path_factory.mktemp("data")
    return make_demo_data(root, 16, seed=2, audio_share=0.0, codec=codec, chat=True)


@pytest.fixture(scope="module")
def hf_loss(vl, data) -> float:
    from transformers import Qwen2VLForConditionalGeneration

    cfg = TrainConfig(data=str(data), model=str(vl), steps=1, global_batch=8, microbatches=2)
    return transformers_loss(Qwen2VLForConditionalGeneration, vl, cfg)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_vit_and_two_llm_stages_equal_transformers_and_the_reference(
    vl, data, hf_loss, tmp_path, policy
):
    """3 ranks: the ViT, LLM stage 0, LLM stage 1."""
    train(data, tmp_path, 3, "--model", str(vl), "--pp", "2", "--policy", policy, *STEP)
    metrics = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["loss"] == pytest.approx(hf_loss, rel=1e-5)
    cfg = TrainConfig(
        data=str(data), model=str(vl), policy=policy, steps=1, global_batch=8, microbatches=2
    )
    assert_matches_reference(tmp_path, cfg)


def test_tied_embeddings_over_two_stages_and_two_replicas(tmp_path):
    """Qwen2.5-VL with tied embeddings: the first and last stage of each replica hold a copy
    of the embedding; their summed gradient keeps them one tensor (6 ranks)."""
    vl = tiny_vl(tmp_path / "vl25", kind="qwen2_5_vl", tie=True)
    data = make_demo_data(
        tmp_path / "data", 16, seed=4, audio_share=0.0, codec=HFCodec(vl, hf_model(vl))
    )
    out = tmp_path / "run"
    args = ["--model", str(vl), "--pp", "2", "--dp", "2", "--steps", "2", "--global-batch", "8"]
    train(data, out, 6, *args, "--microbatches", "2", "--lr", "1e-2")
    first, last = torch.load(out / "params-llm.s0.pt"), torch.load(out / "params-llm.s1.pt")
    key = "model.embed_tokens.weight"
    assert torch.equal(first[key], last[key])
    cfg = TrainConfig(
        data=str(data), model=str(vl), steps=2, global_batch=8, microbatches=2, dp=2, lr=1e-2
    )
    assert_matches_reference(out, cfg)


def _entrain(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "entrain", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def test_lr_zero_round_trip_is_bitwise(vl, data, tmp_path):
    run = tmp_path / "run"
    train(
        data, run, 3, "--model", str(vl), "--pp", "2", "--lr", "0", "--checkpoint-every", "1", *STEP
    )
    res = _entrain("export", str(run), "-o", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    src, out = (
        load_file(vl / "model.safetensors"),
        load_file(tmp_path / "out" / "model.safetensors"),
    )
    assert set(src) == set(out)
    for k in src:
        assert src[k].dtype == out[k].dtype and torch.equal(src[k], out[k]), k
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (vl / f).read_bytes()


def test_trained_export_loads_in_transformers_with_entrains_logits(vl, data, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    from entrain.runtime.inputs import image_patches
    from entrain.runtime.setup import open_dataset, source_of

    run = tmp_path / "run"
    train(data, run, 3, "--model", str(vl), "--pp", "2", "--lr", "1e-2", "--steps", "2",
          "--global-batch", "8", "--microbatches", "2", "--checkpoint-every", "2")  # fmt: skip
    res = _entrain("export", str(run), "-o", str(tmp_path / "hf"), "--max-shard-size", "300KB")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()  # sharded as asked
    trained = {}
    for f in run.glob("params-*.pt"):
        trained.update(torch.load(f))
    # Entrain's own forward with the trained parameters, through its modules
    cfg = TrainConfig(data=str(data), model=str(vl), global_batch=8)
    source = source_of(cfg)
    dataset = open_dataset(cfg, source)
    cpu = torch.device("cpu")
    tower, named = source.encoder("vision", cpu)
    stage, more = source.llm_stage(0, 1, cpu)
    with torch.no_grad():
        for k, p in {**named, **more}.items():
            p.copy_(trained[k])
    i = next(i for i, r in enumerate(dataset.records) if len(r.images) == 2)
    vision = source.spec.encoders[0]
    rec = dataset.records[i]
    parts = [image_patches(path, vision, rec.id) for path in rec.images]
    pixels, grid = torch.cat([p for p, _ in parts]), torch.cat([g for _, g in parts])
    inp = dataset.inputs(i)
    with torch.no_grad():
        embs = list(torch.split(tower(pixels, grid), [int(g.prod()) // 4 for g in grid]))
        h = stage.norm(
            stage(stage.embed_sample(inp.ids, inp.spans, [[e] for e in embs]), inp.positions)
        )
        ours = stage.head(h)[0]
        model = Qwen2VLForConditionalGeneration.from_pretrained(
            tmp_path / "hf", dtype=torch.float32
        )
        ids = inp.ids[None]
        theirs = model(
            input_ids=ids,
            pixel_values=pixels,
            image_grid_thw=grid,
            mm_token_type_ids=(ids == dataset.codec.pad_ids["image"]).int(),
        ).logits[0]
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    before = load_file(vl / "model.safetensors")
    assert not torch.equal(
        before["lm_head.weight"], load_file_any(tmp_path / "hf")["lm_head.weight"]
    )


def load_file_any(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def test_a_bad_folder_stops_the_launcher_in_one_line(vl, data, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in vl.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = bad / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-64])
    t0 = time.perf_counter()
    res = _entrain("train", "--data", str(data), "--model", str(bad), "--nproc", "3", "--pp", "2",
                   "--out", str(tmp_path / "run"))  # fmt: skip
    assert res.returncode == 2
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "model.safetensors: cannot read it as safetensors" in lines[0], (
        res.stderr
    )
    assert time.perf_counter() - t0 < 30
    assert not (tmp_path / "run").exists()  # no rank started, nothing trained or written


def test_export_refuses_a_preset_run_and_a_run_without_checkpoints(tmp_path, vl, data):
    run = tmp_path / "run"
    train(data, run, 3, "--model", str(vl), "--pp", "2", *STEP)
    res = _entrain("export", str(run), "-o", str(tmp_path / "x"))
    assert res.returncode == 2 and "no complete checkpoint" in res.stderr
    cfg = json.loads((run / "config.json").read_text())
    cfg["config"]["model"]["name"] = "tiny"
    (run / "config.json").write_text(json.dumps(cfg))
    res = _entrain("export", str(run), "-o", str(tmp_path / "x"))
    assert res.returncode == 2 and "not a Hugging Face model folder" in res.stderr


def test_whisper_audio_from_another_folder_trains_and_exports(vl, tmp_path):
    """The omni case: Qwen2-VL's ViT and LLM, a Whisper encoder from its own folder with a
    new projector (4 ranks), equal to the reference; the export puts the trained Whisper
    encoder beside the vision-language folder."""
    from hf_models import tiny_whisper

    whisper = tiny_whisper(tmp_path / "whisper")
    data = make_demo_data(
        tmp_path / "data", 16, seed=3, audio_share=0.6, codec=HFCodec(vl, hf_model(vl))
    )
    run = tmp_path / "run"
    args = ["--model", str(vl), "--audio-from", str(whisper), "--pp", "2", "--lr", "1e-2"]
    train(data, run, 4, *args, *STEP, "--checkpoint-every", "1")
    cfg = TrainConfig(
        data=str(data), model=str(vl), audio_from=str(whisper), steps=1, global_batch=8,
        microbatches=2, lr=1e-2,
    )  # fmt: skip
    assert_matches_reference(run, cfg)
    res = _entrain("export", str(run), "-o", str(tmp_path / "hf"))
    assert res.returncode == 0, res.stderr
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf" / "audio_encoder")
    trained = torch.load(run / "params-audio.pt")
    w = model.model.encoder.layers[0].fc1.weight
    assert torch.equal(w, trained["audio.model.encoder.layers.0.fc1.weight"])
    assert not torch.equal(
        w, load_file(whisper / "model.safetensors")["model.encoder.layers.0.fc1.weight"]
    )
    proj = load_file(tmp_path / "hf" / "audio_projector.safetensors")
    assert torch.equal(proj["mlp.0.weight"], trained["audio.projector.mlp.0.weight"])


def test_resume_of_a_model_folder_run_is_exact(vl, data, tmp_path):
    """Checkpoints of a folder run hold its tensors by their checkpoint names; stopping
    after step 1 and resuming ends step 2 with the parameters of an uninterrupted run."""
    flags = ["--model", str(vl), "--pp", "2", "--global-batch", "8", "--microbatches", "2"]
    flags += ["--lr", "1e-2"]
    train(data, tmp_path / "straight", 3, *flags, "--steps", "2")
    ckpt = tmp_path / "ckpt"
    train(data, tmp_path / "a", 3, *flags, "--steps", "1", "--checkpoint-every", "1",
          "--checkpoint-dir", str(ckpt))  # fmt: skip
    train(data, tmp_path / "b", 3, *flags, "--steps", "2", "--resume", str(ckpt))
    for f in (tmp_path / "straight").glob("params-*.pt"):
        want, got = torch.load(f), torch.load(tmp_path / "b" / f.name)
        assert set(want) == set(got)
        assert all(torch.equal(want[k], got[k]) for k in want), f.name

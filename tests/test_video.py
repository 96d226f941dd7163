"""Video in the runtime: frame groups (temporal patches) are the units the encoder runs,
spread over encoder microbatches as the scheduler plans, with every policy ending the step
as the single-process reference does; a video's embeddings equal what transformers computes
from the whole video; bad files are named."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from runtime_helpers import assert_matches_reference, train

from entrain.runtime.demo_data import make_demo_data, write_video
from entrain.runtime.inputs import SampleError, image_patches, load_records, video_arrays
from entrain.runtime.setup import TrainConfig, make_step, open_dataset, source_of
from entrain.runtime.validate import validate_samples
from entrain.schedule import POLICIES
from entrain.workload.manifest import read_manifest

pytestmark = [pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """Images, audio and short videos (MPEG-4 files and folders of PNG frames)."""
    return make_demo_data(tmp_path_factory.mktemp("v"), 30, seed=5, video_share=0.6)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_video_and_images_train_with_every_policy(videos, tmp_path, policy):
    train(videos, tmp_path, 3, "--policy", policy, "--steps", "1", "--global-batch", "10",
          "--microbatches", "3")  # fmt: skip
    cfg = TrainConfig(data=str(videos), policy=policy, steps=1, global_batch=10, microbatches=3)
    assert_matches_reference(tmp_path, cfg)


def test_a_long_video_is_spread_over_encoder_microbatches(tmp_path):
    """One 24-frame video (12 temporal patches) among samples with small images: Entrain
    places its frame groups in several encoder microbatches, and the step still equals the
    reference."""
    root = tmp_path / "data"
    manifest = make_demo_data(root, 8, seed=6, audio_share=0.0, sides=(28, 44))
    frames = [np.full((56, 84, 3), 20 * k % 255, dtype=np.uint8) for k in range(24)]
    frames = [f + np.eye(56, 84, k, dtype=np.uint8)[..., None] * 200 for k, f in enumerate(frames)]
    write_video(root / "long.mp4", frames)
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    lines[0].update(video=[[24, 56, 84]])
    lines[0]["files"]["video"] = ["long.mp4"]
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    args = ["--policy", "entrain", "--steps", "1", "--global-batch", "8", "--microbatches", "4"]
    train(manifest, tmp_path / "run", 3, *args, "--lookahead", "unlimited")
    cfg = TrainConfig(data=str(manifest), policy="entrain", steps=1, global_batch=8,
                      microbatches=4, lookahead=None)  # fmt: skip
    data = open_dataset(cfg, source_of(cfg))
    plan = make_step(data, cfg, 0, 1).plan
    first = next(i for i, r in enumerate(data.records) if r.videos)
    st = make_step(data, cfg, 0, 1)
    s = int(np.flatnonzero(st.indices == first)[0])
    mbs = {
        int(plan.asg.unit_mb["vision"][u.index])
        for u in plan.units["vision"]
        if u.sample == s and u.modality == "video"
    }
    assert len([u for u in plan.units["vision"] if u.sample == s and u.modality == "video"]) == 12
    assert len(mbs) > 1, "the long video stayed in one encoder microbatch"
    assert_matches_reference(tmp_path / "run", cfg)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_video_loss_equals_transformers_on_the_whole_video(kind, tmp_path):
    """Entrain encodes each temporal patch on its own; transformers takes the whole video
    (its grid, and Qwen2.5-VL's seconds per temporal patch): the same loss."""
    from hf_models import tiny_vl
    from transformers import AutoModelForImageTextToText

    from entrain.data.codec import HFCodec
    from entrain.models.hf import hf_model
    from entrain.runtime.reference import loss_tokens, reference_params

    folder = tiny_vl(tmp_path / "m", kind=kind)
    data_path = make_demo_data(
        tmp_path / "data", 8, seed=7, audio_share=0.0, video_share=1.0, chat=True,
        codec=HFCodec(folder, hf_model(folder)),
    )  # fmt: skip
    cfg = TrainConfig(data=str(data_path), model=str(folder), steps=1, global_batch=8)
    losses: list[float] = []
    reference_params(cfg, losses=losses)
    source = source_of(cfg)
    data = open_dataset(cfg, source)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    vision = source.spec.encoders[0]
    total = 0.0
    one = dataclasses.replace(cfg, policy="sequential", lookahead=None, microbatches=1)
    with torch.no_grad():
        for i in map(int, make_step(data, one, 0, 1).indices):
            rec, tok = data.records[i], data.tokens(i)
            ids = torch.from_numpy(tok.input_ids)[None]
            extra: dict = {}
            if rec.videos:
                size = data.workload.items["video"].size[
                    int(np.searchsorted(data.workload.items["video"].sample, i))
                ]
                groups = video_arrays(rec.videos[0], tuple(size), vision, rec.id)
                extra["pixel_values_videos"] = torch.from_numpy(
                    np.concatenate([p for p, _ in groups])
                )
                extra["video_grid_thw"] = torch.tensor([[len(groups), *groups[0][1][0, 1:]]])
                if kind == "qwen2_5_vl":
                    extra["second_per_grid_ts"] = torch.tensor([2 / rec.video_fps])
            if rec.images:
                parts = [image_patches(p, vision, rec.id) for p in rec.images]
                extra["pixel_values"] = torch.cat([p for p, _ in parts])
                extra["image_grid_thw"] = torch.cat([g for _, g in parts])
            pads = data.codec.pad_ids
            mm = (ids == pads["image"]).int() + (ids == pads["video"]).int() * 2
            out = model(input_ids=ids, labels=torch.from_numpy(tok.labels)[None],
                        mm_token_type_ids=mm, **extra)  # fmt: skip
            total += float(out.loss) * tok.targets
    want = total / loss_tokens(data, make_step(data, one, 0, 1).indices)
    assert losses[0] == pytest.approx(want, rel=1e-5)


def test_bad_videos_are_named_with_sample_and_file(tmp_path):
    root = tmp_path / "data"
    manifest = make_demo_data(root, 12, seed=9, audio_share=0.0, video_share=1.0)
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    files = [i for i, x in enumerate(lines) if x["files"]["video"][0].endswith(".mp4")]
    folders = [i for i, x in enumerate(lines) if not x["files"]["video"][0].endswith(".mp4")]
    truncated, garbage, short = files[0], files[1], folders[0]
    path = root / lines[truncated]["files"]["video"][0]
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 3])
    (root / lines[garbage]["files"]["video"][0]).write_bytes(b"not a video at all" * 20)
    lines[short]["video"][0][0] += 3  # the folder holds fewer frames than this says
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    records, workload = load_records(manifest), read_manifest(manifest)
    from entrain.models import load_spec

    bad = {b.id: b.reason for b in validate_samples(records, workload, load_spec("tiny"))}
    for i in (truncated, garbage, short):
        sid, file = lines[i]["id"], lines[i]["files"]["video"][0]
        assert sid in bad and file in bad[sid], (sid, bad)
    assert (
        "fewer than the manifest" in bad[lines[short]["id"]]
        or "frame image(s)" in bad[lines[short]["id"]]
    )
    assert len(bad) == 3
    with pytest.raises(SampleError, match=r"sample '.*': .*\.mp4"):
        rec = records[garbage]
        video_arrays(
            rec.videos[0], tuple(lines[garbage]["video"][0]), load_spec("tiny").encoders[0], rec.id
        )


def test_manifest_of_llava_video_records_trains_with_the_model(tmp_path):
    """`entrain manifest llava` reads video files and folders of frames (frames at
    --video-fps), keeps `<video>` where the turn puts it, and counts as training does."""
    from hf_models import tiny_vl

    from entrain.data.readers import ReaderOptions, convert

    folder = tiny_vl(tmp_path / "m")
    clip = [np.full((48, 64, 3), 20 * k, dtype=np.uint8) for k in range(12)]
    write_video(tmp_path / "clip.mp4", clip, fps=4)  # 3 s
    (tmp_path / "frames").mkdir()
    from PIL import Image

    for k in range(5):
        Image.fromarray(clip[k]).save(tmp_path / "frames" / f"{k:03d}.png")
    src = tmp_path / "video.json"
    src.write_text(json.dumps([
        {"id": "a", "video": "clip.mp4", "conversations": [
            {"from": "human", "value": "what happens in <video>?"},
            {"from": "gpt", "value": "the picture gets brighter"}]},
        {"id": "b", "videos": ["frames"], "conversations": [
            {"from": "human", "value": "describe"}, {"from": "gpt", "value": "grey frames"}]},
    ]))  # fmt: skip
    out = tmp_path / "m.jsonl"
    convert("llava", src, out, ReaderOptions(tokenizer=str(folder)))
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert recs[0]["video"] == [[6, 48, 64]] and recs[0]["video_fps"] == 2.0  # 3 s at 2 fps
    assert recs[1]["video"] == [[5, 48, 64]]  # a folder: its frames as they are
    cfg = TrainConfig(data=str(out), model=str(folder), global_batch=2, microbatches=2)
    data = open_dataset(cfg, source_of(cfg))  # text_tokens and sizes as training counts
    assert [s.modality for s in data.tokens(0).spans] == ["video"]
    source = source_of(cfg)
    bad = validate_samples(load_records(out), read_manifest(out), source.spec, codec=source.codec())
    assert bad == []  # the files decode as the manifest says

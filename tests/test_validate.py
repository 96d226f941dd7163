"""Checking a training manifest's samples against their files before training: each kind
of bad input (corrupt, truncated, missing or empty files, sizes and durations that differ
from the manifest, samples over the token cap) is reported naming the sample, its manifest
line and the file, and good samples are not reported."""

from __future__ import annotations

import dataclasses
import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from entrain.cost.batch import cost_batch
from entrain.models.load import load_spec
from entrain.models.spec import AudioSpec
from entrain.runtime.demo_data import make_demo_data
from entrain.runtime.inputs import SAMPLE_RATE, load_records
from entrain.runtime.validate import (
    AUDIO_DURATION,
    CORRUPT_IMAGE,
    EMPTY_AUDIO,
    IMAGE_SIZE,
    MISSING_FILE,
    NO_ENCODER,
    TEXT_TOKENS,
    TOO_LARGE,
    BadSample,
    summary,
    validate_samples,
)
from entrain.workload.manifest import read_manifest

SPEC = load_spec("tiny")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("base"), 24, seed=7, audio_share=0.5)


@pytest.fixture
def data(base: Path, tmp_path: Path) -> Path:
    """A fresh copy of the demo data, free to break; returns its manifest."""
    shutil.copytree(base.parent, tmp_path / "d")
    return tmp_path / "d" / base.name


def check(manifest: Path, **kw) -> list[BadSample]:
    return validate_samples(load_records(manifest), read_manifest(manifest), SPEC, **kw)


def lines(manifest: Path) -> list[dict]:
    return [json.loads(t) for t in manifest.read_text().splitlines()]


def write_lines(manifest: Path, recs: list[dict]) -> None:
    manifest.write_text("".join(json.dumps(r) + "\n" for r in recs))


def first_with(manifest: Path, modality: str) -> tuple[int, dict]:
    """(index, line) of the first sample holding an item of `modality`."""
    return next((i, r) for i, r in enumerate(lines(manifest)) if r["files"][modality])


def write_wav(path: Path, n: int) -> None:
    x = 0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / SAMPLE_RATE)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((x * 32767).astype(np.int16).tobytes())


def only(bad: list[BadSample], index: int, rec: dict) -> BadSample:
    """The one bad sample, checked to be the broken one (manifest lines are index + 1)."""
    assert [(b.index, b.id, b.line) for b in bad] == [(index, rec["id"], index + 1)], bad
    return bad[0]


def test_clean_data_has_no_bad_samples(data: Path):
    calls = []
    assert check(data, on_progress=calls.append) == []
    assert calls == [1] * 24
    assert check(data, workers=4) == []
    assert summary([], data) == f"no bad samples in {data}"


def test_corrupt_image(data: Path):
    i, rec = first_with(data, "image")
    path = data.parent / rec["files"]["image"][0]
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))
    b = only(check(data), i, rec)
    assert b.kind == CORRUPT_IMAGE
    assert b.reason.startswith(f"image[0] ({path}): cannot decode")


def test_truncated_image(data: Path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    i, rec = first_with(data, "image")
    path = data.parent / rec["files"]["image"][0]
    noise = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)  # noise barely compresses: pixel data fills the file
    recs = lines(data)
    recs[i]["image"][0] = [200, 200]
    write_lines(data, recs)
    assert check(data) == []  # intact, it is fine
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with Image.open(path) as im:  # the header still reads: only a full decode finds it
        assert im.size == (200, 200)
    b = only(check(data), i, rec)
    assert b.kind == CORRUPT_IMAGE
    assert f"image[0] ({path}): cannot decode" in b.reason and "truncated" in b.reason


def test_image_in_a_later_position(data: Path):
    i, rec = next((i, r) for i, r in enumerate(lines(data)) if len(r["files"]["image"]) >= 2)
    path = data.parent / rec["files"]["image"][1]
    path.write_bytes(b"")
    b = only(check(data), i, rec)
    assert b.reason.startswith(f"image[1] ({path}): cannot decode")


def test_empty_audio(data: Path):
    i, rec = first_with(data, "audio")
    path = data.parent / rec["files"]["audio"][0]
    write_wav(path, 0)
    b = only(check(data), i, rec)
    assert b.kind == EMPTY_AUDIO
    assert b.reason == f"audio[0] ({path}): holds no audio"


def test_audio_not_16_bit_16_khz(data: Path):
    i, rec = first_with(data, "audio")
    path = data.parent / rec["files"]["audio"][0]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 8000)
    b = only(check(data), i, rec)
    assert f"audio[0] ({path}): must be 16-bit PCM at 16000 Hz" in b.reason
    path.write_bytes(b"RIFF-not-really")
    b = only(check(data), i, rec)
    assert b.reason.startswith(f"audio[0] ({path}): cannot read audio")


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_manifest_names_a_missing_file(data: Path, modality: str):
    i, rec = first_with(data, modality)
    recs = lines(data)
    recs[i]["files"][modality][0] = f"{modality}/nope.bin"
    write_lines(data, recs)
    b = only(check(data), i, rec)
    assert b.kind == MISSING_FILE
    assert b.reason == f"{modality}[0] ({data.parent / modality / 'nope.bin'}): file not found"


def test_image_size_differs_from_manifest(data: Path):
    i, rec = first_with(data, "image")
    h, w = rec["image"][0]
    recs = lines(data)
    recs[i]["image"][0] = [h + 1, w]
    write_lines(data, recs)
    b = only(check(data), i, rec)
    assert b.kind == IMAGE_SIZE
    path = data.parent / rec["files"]["image"][0]
    assert b.reason == (
        f"image[0] ({path}): is {h}x{w} pixels (height x width) but the manifest says {h + 1}x{w}"
    )


def test_audio_duration_differs_from_manifest(data: Path):
    i, rec = first_with(data, "audio")
    seconds = rec["audio"][0]
    recs = lines(data)
    recs[i]["audio"][0] = seconds + 0.5
    write_lines(data, recs)
    b = only(check(data), i, rec)
    assert b.kind == AUDIO_DURATION
    path = data.parent / rec["files"]["audio"][0]
    assert b.reason.startswith(f"audio[0] ({path}): lasts {seconds:.4f} s but the manifest")


def test_audio_within_tolerance_but_other_encoder_positions(data: Path):
    """0.005 s apart is within tolerance, but when it crosses a frame (1/25 s for the tiny
    model) the runtime would make one more LLM token than the step was planned with."""
    assert SPEC.encoder_for("audio").frames_per_second == 25
    i, rec = first_with(data, "audio")
    path = data.parent / rec["files"]["audio"][0]
    recs = lines(data)
    write_wav(path, int(4.005 * SAMPLE_RATE))  # 100.125 frames: 101 positions
    recs[i]["audio"][0] = 4.0  # 100 positions
    write_lines(data, recs)
    b = only(check(data), i, rec)
    assert b.kind == AUDIO_DURATION and "101 encoder position(s)" in b.reason
    write_wav(path, int(4.01 * SAMPLE_RATE))  # 100.25 frames: 101 positions
    recs[i]["audio"][0] = 4.015  # 100.375 frames: 101 positions too
    write_lines(data, recs)
    assert check(data) == []


def test_sample_over_max_sample_tokens(data: Path):
    llm = cost_batch(read_manifest(data), SPEC).llm_tokens
    cap = int(np.sort(llm)[-3])  # the two largest (at least) exceed it
    over = np.flatnonzero(llm > cap).tolist()
    assert 1 <= len(over) < len(llm)
    bad = check(data, max_sample_tokens=cap)
    recs = lines(data)
    assert [(b.index, b.id, b.line) for b in bad] == [(s, recs[s]["id"], s + 1) for s in over]
    for b in bad:
        assert b.kind == TOO_LARGE
        assert b.reason == f"{llm[b.index]} LLM tokens, more than --max-sample-tokens {cap}"
    assert check(data, max_sample_tokens=int(llm.max())) == []
    with pytest.raises(ValueError, match="max-sample-tokens"):
        check(data, max_sample_tokens=0)


def test_text_tokens_differ_from_text(data: Path):
    i, rec = 3, lines(data)[3]
    recs = lines(data)
    recs[i]["text_tokens"] += 1
    write_lines(data, recs)
    b = only(check(data), i, rec)
    assert b.kind == TEXT_TOKENS
    assert b.reason == (
        f"declares text_tokens={rec['text_tokens'] + 1} but its text has "
        f"{rec['text_tokens']} tokens"
    )


def test_model_without_an_audio_encoder(data: Path):
    vision_only = dataclasses.replace(
        SPEC, encoders=tuple(e for e in SPEC.encoders if not isinstance(e, AudioSpec))
    )
    recs = lines(data)
    with_audio = [i for i, r in enumerate(recs) if r.get("audio")]
    bad = validate_samples(
        load_records(data), read_manifest(data), vision_only, max_sample_tokens=10**6
    )
    assert [b.index for b in bad] == with_audio
    assert all(b.kind == NO_ENCODER and "no encoder for audio" in b.reason for b in bad)


def test_every_bad_sample_is_reported_once_in_order(data: Path):
    recs = lines(data)
    ia, ra = first_with(data, "image")
    ib, rb = next((i, r) for i, r in enumerate(recs) if r["files"]["audio"] and i != ia)
    (data.parent / ra["files"]["image"][0]).write_bytes(b"not a png")
    write_wav(data.parent / rb["files"]["audio"][0], 0)
    ic = next(i for i in range(len(recs)) if i not in (ia, ib))
    recs[ic]["image"] = recs[ic].get("image") or [[10, 10]]
    recs[ic]["files"]["image"] = ["images/gone.png"] * len(recs[ic]["image"])
    recs[ia]["text_tokens"] += 1  # a second problem of the same sample joins the first
    write_lines(data, recs)
    progress = []
    bad = check(data, on_progress=progress.append)
    assert progress == [1] * len(recs)
    assert [b.index for b in bad] == sorted({ia, ib, ic})
    by = {b.index: b for b in bad}
    assert by[ia].kind == CORRUPT_IMAGE and "; declares text_tokens=" in by[ia].reason
    assert by[ib].kind == EMPTY_AUDIO and by[ic].kind == MISSING_FILE
    assert check(data, workers=4) == bad
    text = summary(bad, data, show=2)
    assert text.splitlines()[0].startswith(f"3 bad sample(s) in {data}: ")
    assert sorted(text.splitlines()[0].split(": ", 1)[1].split(", ")) == [
        "1 corrupt image",
        "1 empty audio file",
        "1 missing file",
    ]
    assert text.splitlines()[1:] == [f"  {b.message(data)}" for b in bad[:2]] + ["  ... and 1 more"]


def test_message_names_manifest_line_and_sample():
    b = BadSample(4, "demo-00004", 5, "image[0] (x.png): file not found", MISSING_FILE)
    msg = "m.jsonl:5: sample 'demo-00004': image[0] (x.png): file not found"
    assert b.message("m.jsonl") == msg


def test_records_and_workload_must_match(data: Path, base: Path):
    recs = lines(data)
    write_lines(data, recs[1:])
    with pytest.raises(ValueError, match="same manifest"):
        validate_samples(load_records(base), read_manifest(data), SPEC)


def test_headers_only_misses_a_truncation_that_full_decoding_finds(tmp_path):
    from PIL import Image

    from entrain.models.load import load_spec
    from entrain.runtime.demo_data import make_demo_data
    from entrain.runtime.inputs import load_records
    from entrain.runtime.validate import validate_samples
    from entrain.workload.manifest import read_manifest

    manifest = make_demo_data(tmp_path, 8, seed=1, audio_share=0.0)
    rec = next(r for r in load_records(manifest) if r.images)
    with Image.open(rec.images[0]) as im:
        size = im.size
    noise = Image.effect_noise(size, 80).convert("RGB")  # pixel data that does not compress
    noise.save(rec.images[0])
    data = rec.images[0].read_bytes()
    rec.images[0].write_bytes(data[: len(data) // 2])
    spec = load_spec("tiny")
    args = (load_records(manifest), read_manifest(manifest), spec)
    assert [b.id for b in validate_samples(*args)] == [rec.id]
    assert validate_samples(*args, decode=False) == []

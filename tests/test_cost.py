"""The cost model: tokens from pixels and seconds, analytic FLOPs, costed batches."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from entrain.cost import (
    CostCoeffs,
    MissingEncoderError,
    analytic_cost_model,
    cost_batch,
    transformer_flops,
)
from entrain.cost.batch import CostedBatch, CostUnitError, common_unit
from entrain.cost.flops import encoder_coeffs
from entrain.cost.hardware import HARDWARE
from entrain.cost.tokens import smart_resize
from entrain.models import PRESETS, AudioSpec, TransformerSpec, VisionSpec
from entrain.workload import MODALITY_FIELDS, ItemTable, Workload
from entrain.workload.traces import generate_workload

FACTOR, MIN_PX, MAX_PX = 28, 3136, 1003520  # Qwen2-VL: 14 px patches x 2 merge, 56*56, 28*28*1280


def make_workload(samples: list[dict]) -> Workload:
    """A workload from manifest-style dicts (ids generated)."""
    items = {}
    for m, fields in MODALITY_FIELDS.items():
        sample, size = [], []
        for s, rec in enumerate(samples):
            for item in rec.get(m, []):
                sample.append(s)
                size.append(item if isinstance(item, list | tuple) else [item])
        items[m] = ItemTable(
            np.asarray(sample, dtype=np.int64),
            np.asarray(size, dtype=np.float64).reshape(-1, len(fields)),
        )
    return Workload(
        ids=[f"s{i}" for i in range(len(samples))],
        text_tokens=np.asarray([r.get("text_tokens", 0) for r in samples], dtype=np.int64),
        items=items,
    )


def resize(h, w):
    hb, wb = smart_resize(np.array([h]), np.array([w]), FACTOR, MIN_PX, MAX_PX)
    return int(hb[0]), int(wb[0])


# ------------------------------------------------------------------------------- smart_resize


def test_smart_resize_hand_values():
    # 336/28 = 12 exactly; 336*336 = 112,896 is inside [3136, 1003520]: unchanged.
    assert resize(336, 336) == (336, 336)
    # 1000/28 = 35.71 -> 36 -> 1008; 500/28 = 17.86 -> 18 -> 504; 1008*504 = 508,032 in range.
    assert resize(1000, 500) == (1008, 504)
    # 4000x3000: rounded 4004*2996 = 11,995,984 > max, so beta = sqrt(12e6 / 1003520) = 3.4580;
    # 4000/3.4580 = 1156.7 -> floor(41.31)*28 = 1148; 3000/3.4580 = 867.5 -> floor(30.98)*28 = 840.
    assert resize(4000, 3000) == (1148, 840)
    # 10x10: max(28, round(0.36)*28) = 28 each, 784 < min, so beta = sqrt(3136/100) = 5.6;
    # ceil(10*5.6/28) = 2 -> 56 each: 56*56 = 3136 = min_pixels.
    assert resize(10, 10) == (56, 56)
    # 3000x4000 is the transpose of the 4000x3000 case.
    assert resize(3000, 4000) == (840, 1148)


def test_smart_resize_vectorized_and_array_bounds():
    h = np.array([336, 1000, 4000, 10])
    w = np.array([336, 500, 3000, 10])
    hb, wb = smart_resize(h, w, FACTOR, MIN_PX, MAX_PX)
    assert hb.tolist() == [336, 1008, 1148, 56]
    assert wb.tolist() == [336, 504, 840, 56]
    # a per-item max_pixels (as video frames use) applies item by item
    hb, wb = smart_resize(h[:2], w[:2], FACTOR, MIN_PX, np.array([MAX_PX, 28 * 28 * 100]))
    assert (hb[0], wb[0]) == (336, 336)
    assert hb[1] * wb[1] <= 28 * 28 * 100
    assert hb[1] % 28 == 0 and wb[1] % 28 == 0


# Qwen2-VL rejects aspect ratios of 200 or more; inside that, the bounds always hold.
@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 20_000), w=st.integers(1, 20_000))
def test_smart_resize_properties(h, w):
    if max(h, w) / min(h, w) >= 200:
        return
    hb, wb = resize(h, w)
    assert hb % FACTOR == 0 and wb % FACTOR == 0
    assert hb >= FACTOR and wb >= FACTOR
    assert MIN_PX <= hb * wb <= MAX_PX
    # already on the grid and inside the bounds: unchanged
    if h % FACTOR == 0 and w % FACTOR == 0 and MIN_PX <= h * w <= MAX_PX:
        assert (hb, wb) == (h, w)
    # the aspect ratio survives (to within the rounding of each side to the grid)
    assert abs(math.log((hb / wb) / (h / w))) < 0.7 or min(h, w) < FACTOR


# ------------------------------------------------------------------------- tokens per preset


def test_llava_every_image_is_577_and_576():
    spec = PRESETS["llava-1.5-7b"]()
    sizes = [[10, 10], [336, 336], [4000, 3000], [28, 9000], [1080, 1920]]
    w = make_workload(
        [{"text_tokens": 5, "image": sizes[:2]}, {"text_tokens": 0, "image": sizes[2:]}]
    )
    b = cost_batch(w, spec)
    u = b.units["vision"]
    assert len(u) == 5 and u.n_items == 5
    assert u.tokens.tolist() == [577] * 5
    assert u.llm_tokens.tolist() == [576] * 5
    assert u.sample.tolist() == [0, 0, 1, 1, 1]
    assert b.llm_tokens.tolist() == [5 + 2 * 576, 3 * 576]


def test_qwen2_vl_images():
    spec = PRESETS["qwen2-vl-7b"]()
    # 336x336: (336/14)^2 = 576 patches, merged 2x2 -> 144 LLM tokens.
    # 1000x500 -> 1008x504: (1008/14)*(504/14) = 72*36 = 2592 patches, 648 LLM tokens.
    w = make_workload([{"text_tokens": 10, "image": [[336, 336], [1000, 500]]}])
    b = cost_batch(w, spec)
    u = b.units["vision"]
    assert u.tokens.tolist() == [576, 2592]
    assert u.llm_tokens.tolist() == [144, 648]
    assert b.llm_tokens.tolist() == [10 + 144 + 648]


@pytest.mark.parametrize("frames, units", [(1, 1), (2, 1), (3, 2), (16, 8), (17, 9), (64, 32)])
def test_video_units_are_temporal_patches(frames, units):
    spec = PRESETS["qwen2-vl-7b"]()
    assert spec.encoders[0].temporal_patch_size == 2
    w = make_workload(
        [
            {"text_tokens": 3, "video": [[frames, 448, 448]]},
            {"text_tokens": 1, "image": [[336, 336]]},
        ]
    )
    b = cost_batch(w, spec)
    u = b.units["vision"]
    video = u.sample == 0
    assert int(video.sum()) == units  # ceil(F / 2)
    assert len(set(u.tokens[video].tolist())) == 1  # every temporal patch of a video is alike
    assert len(set(u.item[video].tolist())) == 1
    assert u.item[~video].tolist() != u.item[video][:1].tolist()  # the image is its own item
    assert b.llm_tokens[0] == 3 + int(u.llm_tokens[video].sum())
    assert b.llm_tokens[1] == 1 + 144


def test_longer_video_gets_smaller_frames():
    spec = PRESETS["qwen2-vl-7b"]()
    w = make_workload([{"video": [[16, 1080, 1920]]}, {"video": [[600, 1080, 1920]]}])
    u = cost_batch(w, spec).units["vision"]
    per_unit = {s: set(u.tokens[u.sample == s].tolist()) for s in (0, 1)}
    assert max(per_unit[1]) < min(per_unit[0])


def test_omni_audio_chunks():
    spec = PRESETS["omni-7b"]()
    audio = spec.encoder_for("audio")
    assert isinstance(audio, AudioSpec) and audio.pad_to_chunk is False
    w = make_workload(
        [{"text_tokens": 2, "audio": [65.0]}, {"text_tokens": 0, "audio": [30.0, 0.5]}]
    )
    b = cost_batch(w, spec)
    u = b.units["audio"]
    # 65 s = 30 + 30 + 5 s at 50 positions/s; 2x pooling to the LLM.
    # 30 s exactly is one chunk; 0.5 s is 25 positions, ceil(25/2) = 13 LLM tokens.
    assert u.sample.tolist() == [0, 0, 0, 1, 1]
    assert u.item.tolist() == [0, 0, 0, 1, 2]
    assert u.tokens.tolist() == [1500, 1500, 250, 1500, 25]
    assert u.llm_tokens.tolist() == [750, 750, 125, 750, 13]
    assert b.llm_tokens.tolist() == [2 + 1625, 750 + 13]


def test_audio_padding_costs_a_whole_chunk_but_not_llm_tokens():
    spec = PRESETS["omni-7b"]()
    i = next(k for k, e in enumerate(spec.encoders) if isinstance(e, AudioSpec))
    enc = list(spec.encoders)
    enc[i] = dataclasses.replace(enc[i], pad_to_chunk=True)
    padded = dataclasses.replace(spec, encoders=tuple(enc))
    w = make_workload([{"text_tokens": 0, "audio": [65.0]}])
    u = cost_batch(w, padded).units["audio"]
    assert u.tokens.tolist() == [1500, 1500, 1500]
    assert u.llm_tokens.tolist() == [750, 750, 125]


def test_mixed_sample_llm_tokens_by_hand():
    spec = PRESETS["omni-7b"]()
    w = make_workload(
        [
            {"text_tokens": 10, "image": [[336, 336]], "audio": [65.0]},  # 10 + 144 + 1625
            {"text_tokens": 7},  # text only
            {"text_tokens": 0, "image": [[336, 336], [336, 336]]},  # 2 * 144
        ]
    )
    b = cost_batch(w, spec)
    assert b.llm_tokens.tolist() == [1779, 7, 288]
    assert b.text_tokens.tolist() == [10, 7, 0]
    assert b.modules == ("vision", "audio", "llm")


@pytest.mark.parametrize(
    "kind, model", [("omni", "omni-7b"), ("video", "qwen2-vl-7b"), ("interleaved", "llava-1.5-7b")]
)
def test_costed_generated_batch_is_consistent(kind, model):
    spec = PRESETS[model]()
    w = generate_workload(kind, 120, seed=4)
    cm = analytic_cost_model(spec)
    b = cost_batch(w, spec, cm)
    n = len(w)
    extra = np.zeros(n)
    for name, u in b.units.items():
        assert np.all(np.diff(u.sample) >= 0)
        assert np.all(u.tokens > 0) and np.all(u.llm_tokens > 0)
        np.testing.assert_allclose(u.cost, cm[name](u.tokens))
        extra += np.bincount(u.sample, weights=u.llm_tokens, minlength=n)
        # every item of the encoder's modalities is in some unit
        enc = next(e for e in spec.encoders if e.name == name)
        assert u.n_items == sum(len(w.items[m]) for m in enc.modalities)
    np.testing.assert_array_equal(b.llm_tokens, w.text_tokens + extra)
    # the LLM side also runs the projectors of frozen encoders, per unit of that encoder
    proj = np.zeros(n)
    for name, p in cm.llm_projectors.items():
        u = b.units[name]
        proj += np.bincount(u.sample, weights=p(u.tokens), minlength=n)
    np.testing.assert_allclose(b.llm_cost, cm["llm"](b.llm_tokens) + proj)
    np.testing.assert_allclose(b.llm_cost, b.llm_fwd + b.llm_bwd)
    cm_mat = b.cost_matrix()
    assert cm_mat.shape == (n, len(spec.modules))
    np.testing.assert_allclose(cm_mat.sum(axis=0)[:-1], [u.cost.sum() for u in b.units.values()])


def test_items_per_encoder_are_all_units():
    spec = PRESETS["qwen2-vl-7b"]()
    w = generate_workload("video", 80, seed=1)
    u = cost_batch(w, spec).units["vision"]
    assert u.n_items == len(w.items["image"]) + len(w.items["video"])
    assert len(np.unique(u.item)) == u.n_items


def test_missing_encoder_names_the_modality():
    w = make_workload(
        [{"text_tokens": 3, "image": [[336, 336]]}, {"text_tokens": 4, "audio": [2.0]}]
    )
    with pytest.raises(MissingEncoderError) as e:
        cost_batch(w, PRESETS["llava-1.5-7b"]())
    assert "audio" in str(e.value)
    assert "llava-1.5-7b" in str(e.value)
    # the same workload is fine for a model with an audio encoder
    cost_batch(w, PRESETS["omni-7b"]())


# ------------------------------------------------------------------------------- analytic cost


def test_transformer_flops_by_hand():
    t = TransformerSpec(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        gated_mlp=True,
        causal=True,
        vocab_size=100,
    )
    h, layers, inter, vocab = 64, 2, 128, 100
    kv = 2 * (64 // 4)  # 2 kv heads of head_dim 16 = 32
    proj = 2 * (h * h + h * kv + h * kv + h * h)  # q, k, v, o: 2*(4096+2048+2048+4096) = 24576
    mlp = 2 * 3 * h * inter  # gate, up, down: 49152
    head = 2 * h * vocab  # 12800
    lin = layers * (proj + mlp) + head  # 2*73728 + 12800 = 160256
    att = layers * 2 * 2 * h * 0.5  # QK^T and PV, 2*h FLOPs each per token pair, half causal: 256
    assert (lin, att) == (160256, 256)
    assert transformer_flops(t) == pytest.approx((lin, att))

    # An encoder: two-matrix MLP, full attention, no LM head, no GQA.
    e = TransformerSpec(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        gated_mlp=False,
        causal=False,
    )
    lin_e = 3 * (2 * 4 * 32 * 32 + 2 * 2 * 32 * 64)  # 3 * (8192 + 8192) = 49152
    att_e = 3 * 4 * 32  # 384
    assert transformer_flops(e) == pytest.approx((lin_e, att_e))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_costs_are_monotone_in_tokens(name):
    cm = analytic_cost_model(PRESETS[name]())
    x = np.arange(0, 20_000, 37)
    for module, c in cm.coeffs.items():
        y = c(x)
        assert y[0] == 0
        assert np.all(np.diff(y) > 0), module
        assert c.a > 0 and c.b > 0


def test_more_tokens_cost_more_in_a_batch():
    spec = PRESETS["qwen2-vl-7b"]()
    w = make_workload(
        [
            {"text_tokens": 100, "image": [[336, 336]]},
            {"text_tokens": 101, "image": [[336, 336]]},
            {"text_tokens": 100, "image": [[672, 672]]},
        ]
    )
    b = cost_batch(w, spec)
    assert b.llm_cost[1] > b.llm_cost[0]
    assert b.llm_cost[2] > b.llm_cost[0]
    vis = b.module_cost_per_sample("vision")
    assert vis[2] > vis[0] and vis[1] == vis[0]


@pytest.mark.parametrize("name", ["llava-1.5-7b", "qwen2-vl-7b", "omni-7b", "tiny"])
def test_frozen_encoder_costs_less(name):
    spec = PRESETS[name]()
    for enc in spec.encoders:
        hot = encoder_coeffs(dataclasses.replace(enc, frozen=False), spec.llm.hidden_size)
        cold = encoder_coeffs(dataclasses.replace(enc, frozen=True), spec.llm.hidden_size)
        assert cold.a < hot.a
        assert cold.b < hot.b
        # frozen: forward only, and the projector moves to the LLM side (it still trains)
        assert cold.backward.a == 0 and cold.backward.b == 0
        assert cold.a < hot.a / 3


def test_frozen_vision_spec_directly():
    vit = TransformerSpec(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        gated_mlp=False,
        causal=False,
    )
    hot = encoder_coeffs(VisionSpec(encoder=vit, frozen=False), 128)
    cold = encoder_coeffs(VisionSpec(encoder=vit, frozen=True), 128)
    assert cold.a < hot.a and cold.b < hot.b
    assert cold.b == pytest.approx(hot.b / 3)  # attention: forward only vs forward + backward


@pytest.mark.parametrize("name", ["llava-1.5-7b", "qwen2-vl-7b", "omni-7b"])
def test_llm_cost_per_token_of_7b_is_about_6_times_params(name):
    c = analytic_cost_model(PRESETS[name]())["llm"]
    for x in (128, 512, 1024):
        per_token = float(c(x)) / x
        assert 6 * 7e9 / 2 < per_token < 6 * 7e9 * 2, (x, per_token)


def test_frozen_llm_costs_less():
    spec = PRESETS["qwen2-vl-7b"]()
    hot = analytic_cost_model(spec)["llm"]
    cold = analytic_cost_model(dataclasses.replace(spec, llm_frozen=True))["llm"]
    assert cold.a < hot.a


def test_cost_coeffs():
    c = CostCoeffs(2.0, 3.0, 5.0)
    # 0 -> 0 (no tokens, no overhead); 1 -> 2 + 3 + 5 = 10; 4 -> 8 + 48 + 5 = 61
    np.testing.assert_array_equal(c(np.array([0, 1, 4])), [0.0, 10.0, 61.0])
    assert float(c(0)) == 0.0
    assert float(c(2.5)) == pytest.approx(2 * 2.5 + 3 * 6.25 + 5)
    assert float(CostCoeffs(1.5)(4)) == 6.0


def test_costed_batches_carry_their_unit_and_refuse_to_mix():
    """A batch costed in FLOPs and one in measured seconds cannot meet: pooling, planning
    or an unknown unit raise instead of producing times off by orders of magnitude."""
    spec = PRESETS["qwen2-vl-7b"]()
    w = generate_workload("llava-instruct", 8, seed=0)
    flops = cost_batch(w, spec)
    assert flops.unit == "flop"
    secs = dataclasses.replace(flops, unit="s")
    assert common_unit([flops, flops]) == "flop"
    with pytest.raises(CostUnitError, match="mix cost units"):
        CostedBatch.concat([flops, secs])
    with pytest.raises(CostUnitError, match="unknown cost unit"):
        dataclasses.replace(flops, unit="ms")
    hw = HARDWARE["h100"]
    assert hw.seconds(hw.flops(), "flop") == pytest.approx(1.0)
    assert hw.seconds(2.0, "s") == 2.0
    with pytest.raises(ValueError, match="unknown cost unit"):
        hw.seconds(1.0, "ms")

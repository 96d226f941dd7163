"""The discrete-event simulator (sim/simulator.py) on hand-built batches whose answers are
known, and one smoke run at cluster scale."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from entrain.cost.batch import CostedBatch, UnitTable, cost_batch
from entrain.cost.flops import module_params
from entrain.cost.hardware import HARDWARE, Hardware
from entrain.models.load import load_spec
from entrain.models.spec import ModelSpec, TransformerSpec, VisionSpec
from entrain.schedule import POLICIES, assign
from entrain.schedule.assignment import Assignment
from entrain.schedule.parallel import ParallelPlan
from entrain.sim.simulator import simulate
from entrain.workload.traces import generate_workload

IDEAL = Hardware(
    name="ideal",
    peak_flops=1,
    efficiency=1,
    memory_bytes=1e12,
    intra_node_bw=1e30,
    inter_node_bw=1e30,
    latency=0.0,
)
LLM = TransformerSpec(
    hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16
)
TEXT = ModelSpec(name="t", llm=LLM)


def _vit(frozen: bool, layers: int = 1) -> VisionSpec:
    enc = TransformerSpec(
        hidden_size=8,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=16,
        gated_mlp=False,
        causal=False,
    )
    return VisionSpec(encoder=enc, projector_hidden=8, frozen=frozen)


def _vision_model(frozen: bool) -> ModelSpec:
    return ModelSpec(name="v", llm=LLM, encoders=(_vit(frozen),))


def _batch(f, b, P: int, units: dict[str, UnitTable] | None = None, unit: str = "s") -> CostedBatch:
    """One sample per entry; per-stage forward f and backward b, in seconds unless `unit`
    says otherwise (the simulator splits a sample's LLM work evenly over the P stages)."""
    n = len(f)
    return CostedBatch(
        n_samples=n,
        text_tokens=np.full(n, 4, dtype=np.int64),
        llm_tokens=np.full(n, 4, dtype=np.int64),
        llm_fwd=np.asarray(f, dtype=np.float64) * P,
        llm_bwd=np.asarray(b, dtype=np.float64) * P,
        units=units or {},
        unit=unit,
    )


def _units(fwd, bwd) -> UnitTable:
    """One unit per sample, sample i owning unit i."""
    n = len(fwd)
    idx = np.arange(n, dtype=np.int64)
    return UnitTable(
        sample=idx,
        item=idx,
        tokens=np.full(n, 4, dtype=np.int64),
        llm_tokens=np.full(n, 2, dtype=np.int64),
        fwd=np.asarray(fwd, dtype=np.float64),
        bwd=np.asarray(bwd, dtype=np.float64),
    )


def _one_per_microbatch(batch: CostedBatch, D: int, M: int) -> Assignment:
    return Assignment.coupled(batch, D, M, np.arange(D * M))


def _events(res, device: str) -> dict[str, tuple[float, float]]:
    out = {}
    for dev, action, start, end in res.events:
        if dev == device:
            assert action not in out, f"{device} runs {action} twice"
            out[action] = (start, end)
    return out


# ------------------------------------------------------------------------------ text-only 1F1B


@pytest.mark.parametrize("P,M", [(1, 1), (2, 3), (4, 8), (3, 2), (5, 1), (2, 7)])
@pytest.mark.parametrize("f,b", [(1.0, 2.0), (0.5, 0.25)])
def test_uniform_pipeline_time_and_bubbles(P, M, f, b):
    batch = _batch([f] * M, [b] * M, P)
    plan = ParallelPlan(dp=1, llm_pp=P, microbatches=M)
    res = simulate(batch, _one_per_microbatch(batch, 1, M), TEXT, plan, IDEAL)
    assert res.iter_time == (M + P - 1) * (f + b)
    expected_bubbles = 1 - M * (f + b) / ((M + P - 1) * (f + b))
    assert res.bubble_fraction == pytest.approx(expected_bubbles, abs=1e-12)
    assert set(res.busy) == {f"llm.s{s}/r0" for s in range(P)}
    for s in range(P):
        assert res.busy[f"llm.s{s}/r0"] == pytest.approx(M * (f + b))
    assert res.samples == M
    assert res.tokens == 4 * M
    assert res.samples_per_s == pytest.approx(M / res.iter_time)
    assert res.peak_deferred_tokens == 0


def test_heavy_microbatch_hand_computed():
    f, b = [1.0, 2.0, 1.0], [2.0, 4.0, 2.0]
    batch = _batch(f, b, 2)
    plan = ParallelPlan(dp=1, llm_pp=2, microbatches=3)
    res = simulate(batch, _one_per_microbatch(batch, 1, 3), TEXT, plan, IDEAL, record_events=True)
    assert res.iter_time == 16
    expected = {
        "llm.s0/r0": {
            "F0": (0, 1),
            "F1": (1, 3),
            "B0": (4, 6),
            "F2": (6, 7),
            "B1": (10, 14),
            "B2": (14, 16),
        },
        "llm.s1/r0": {
            "F0": (1, 2),
            "B0": (2, 4),
            "F1": (4, 6),
            "B1": (6, 10),
            "F2": (10, 11),
            "B2": (11, 13),
        },
    }
    assert {dev for dev, *_ in res.events} == set(expected)
    for dev, acts in expected.items():
        assert _events(res, dev) == acts
    assert res.busy == {"llm.s0/r0": 12.0, "llm.s1/r0": 12.0}
    assert res.bubble_fraction == pytest.approx(1 - 24 / 32)


def test_events_off_by_default():
    batch = _batch([1.0] * 2, [1.0] * 2, 2)
    plan = ParallelPlan(dp=1, llm_pp=2, microbatches=2)
    res = simulate(batch, _one_per_microbatch(batch, 1, 2), TEXT, plan, IDEAL)
    assert res.events == []


def test_flop_unit_divides_by_achieved_flops():
    hw = replace(IDEAL, peak_flops=4.0, efficiency=0.5)  # 2 FLOP/s on one GPU
    batch = _batch([1.0] * 3, [2.0] * 3, 1, unit="flop")
    plan = ParallelPlan(dp=1, llm_pp=1, microbatches=3)
    res = simulate(batch, _one_per_microbatch(batch, 1, 3), TEXT, plan, hw)
    assert res.iter_time == pytest.approx(3 * (1 + 2) / 2)


# ----------------------------------------------------------------------------------- encoders


@pytest.mark.parametrize("P", [1, 2])
def test_frozen_encoder_runs_no_backward(P):
    M = 4
    plan = ParallelPlan(dp=1, llm_pp=P, microbatches=M, encoder_tp={"vision": 1})
    frozen = _batch([1.0] * M, [2.0] * M, P, {"vision": _units([0.5] * M, [0.0] * M)})
    res = simulate(
        frozen,
        _one_per_microbatch(frozen, 1, M),
        _vision_model(True),
        plan,
        IDEAL,
        record_events=True,
    )
    enc = _events(res, "vision/r0")
    assert sorted(enc) == [f"F{k}" for k in range(M)]
    assert not any(a.startswith("B") for a in enc)
    assert res.busy["vision/r0"] == pytest.approx(0.5 * M)

    trained = _batch([1.0] * M, [2.0] * M, P, {"vision": _units([0.5] * M, [1.0] * M)})
    res = simulate(
        trained,
        _one_per_microbatch(trained, 1, M),
        _vision_model(False),
        plan,
        IDEAL,
        record_events=True,
    )
    enc = _events(res, "vision/r0")
    assert sorted(a for a in enc if a.startswith("B")) == [f"B{k}" for k in range(M)]
    assert res.busy["vision/r0"] == pytest.approx(1.5 * M)
    # a trained encoder's backward of k needs the LLM's gradient of k
    llm = _events(res, "llm.s0/r0")
    for k in range(M):
        assert enc[f"B{k}"][0] >= llm[f"B{k}"][1]


def test_llm_waits_for_its_embeddings():
    """Coupled, P=1: encoder forward e=3 per microbatch, LLM f=1, b=1. The LLM forward of
    microbatch k starts no earlier than the encoder forward of k ends."""
    M, e = 4, 3.0
    batch = _batch([1.0] * M, [1.0] * M, 1, {"vision": _units([e] * M, [0.0] * M)})
    plan = ParallelPlan(dp=1, llm_pp=1, microbatches=M, encoder_tp={"vision": 1})
    res = simulate(
        batch,
        _one_per_microbatch(batch, 1, M),
        _vision_model(True),
        plan,
        IDEAL,
        record_events=True,
    )
    enc, llm = _events(res, "vision/r0"), _events(res, "llm.s0/r0")
    for k in range(M):
        assert llm[f"F{k}"][0] >= enc[f"F{k}"][1]
    # the encoder is the bottleneck: the LLM really waits (does not start at 0)
    assert llm["F0"][0] == pytest.approx(e)
    assert enc[f"F{M - 1}"] == pytest.approx((e * (M - 1), e * M))
    assert res.iter_time == pytest.approx(e * M + 1 + 1)


def _deferred(M: int = 3) -> tuple[CostedBatch, Assignment, Assignment]:
    """Three samples, one unit each; sample 2's unit is encoded in microbatch 0."""
    batch = _batch([1.0] * M, [2.0] * M, 2, {"vision": _units([1.0] * M, [1.0] * M)})
    zeros = np.zeros(M, dtype=np.int64)
    deferred = Assignment(
        dp=1,
        microbatches=M,
        sample_replica=zeros,
        sample_mb=np.arange(M, dtype=np.int64),
        unit_replica={"vision": zeros},
        unit_mb={"vision": np.array([0, 1, 0], dtype=np.int64)},
    )
    return batch, deferred, _one_per_microbatch(batch, 1, M)


def test_deferral_is_waiting():
    batch, deferred, coupled = _deferred()
    assert deferred.violations(batch) == []
    plan = ParallelPlan(dp=1, llm_pp=2, microbatches=3, encoder_tp={"vision": 1})
    spec = _vision_model(False)
    res = simulate(batch, deferred, spec, plan, IDEAL, record_events=True)
    assert np.isfinite(res.iter_time) and res.iter_time > 0
    enc, llm0 = _events(res, "vision/r0"), _events(res, "llm.s0/r0")
    # encoder microbatch 2 is empty: no slice for it (zero-length actions are not recorded)
    assert sorted(enc) == ["B0", "B1", "F0", "F1"]
    # encoder microbatch 0 holds the unit of LLM microbatch 2: its gradient comes back only
    # after stage 0's backward of microbatch 2
    assert enc["B0"][0] >= llm0["B2"][1]
    # and LLM microbatch 2 needs encoder microbatch 0's forward
    assert llm0["F2"][0] >= enc["F0"][1]
    assert res.peak_deferred_tokens > 0

    # coupled, the encoder's backward of 0 does not wait for LLM microbatch 2
    res_c = simulate(batch, coupled, spec, plan, IDEAL, record_events=True)
    enc_c, llm0_c = _events(res_c, "vision/r0"), _events(res_c, "llm.s0/r0")
    assert enc_c["B0"][0] < llm0_c["B2"][1]
    assert res_c.peak_deferred_tokens == 0


def test_units_on_another_replica_feed_the_llm():
    """D=2, M=1: sample 0 (replica 0) has its unit encoded by replica 1's encoder."""
    batch = _batch([1.0, 1.0], [1.0, 1.0], 1, {"vision": _units([5.0, 0.5], [0.0, 0.0])})
    asg = Assignment(
        dp=2,
        microbatches=1,
        sample_replica=np.array([0, 1]),
        sample_mb=np.array([0, 0]),
        unit_replica={"vision": np.array([1, 1])},
        unit_mb={"vision": np.array([0, 0])},
    )
    assert asg.violations(batch) == []
    plan = ParallelPlan(dp=2, llm_pp=1, microbatches=1, encoder_tp={"vision": 1})
    res = simulate(batch, asg, _vision_model(True), plan, IDEAL, record_events=True)
    assert "vision/r0" not in {d for d, *_ in res.events}  # replica 0's encoder has nothing
    enc1 = _events(res, "vision/r1")
    assert enc1["F0"][1] == pytest.approx(5.5)
    for r in (0, 1):
        assert _events(res, f"llm.s0/r{r}")["F0"][0] >= enc1["F0"][1]


# ------------------------------------------------------------------------------ data parallel


@pytest.mark.parametrize("P,gpus_per_node", [(1, 1), (5, 8)])
def test_dp_all_reduce_time(P, gpus_per_node):
    """D=2 with finite bandwidth between the replicas: the LLM's ring all-reduce comes after
    the last backward and adds 2 (D-1)/D grad_bytes / bw."""
    D, M = 2, 3
    batch = _batch([1.0] * D * M, [2.0] * D * M, P)
    plan = ParallelPlan(dp=D, llm_pp=P, microbatches=M)
    asg = _one_per_microbatch(batch, D, M)
    # replicas fit a node (activations cross NVLink); the whole plan does not
    assert plan.gpus_per_replica <= gpus_per_node < plan.world_size
    grad_bytes = module_params(TEXT)["llm"] / (plan.llm_pp * plan.llm_tp) * 2
    bw = grad_bytes / 1.5
    fast = replace(IDEAL, gpus_per_node=gpus_per_node)
    slow = replace(fast, inter_node_bw=bw)
    t_fast = simulate(batch, asg, TEXT, plan, fast).iter_time
    t_slow = simulate(batch, asg, TEXT, plan, slow).iter_time
    assert t_fast == pytest.approx((M + P - 1) * 3.0)
    assert t_slow > t_fast
    assert t_slow - t_fast == pytest.approx(2 * (D - 1) / D * grad_bytes / bw)


@pytest.mark.parametrize("frozen", [False, True])
def test_encoder_all_reduced_only_when_trained(frozen):
    """D=2: each module's gradients are ring all-reduced after its last action; a frozen
    encoder has none. The encoder (8 layers) has more parameters than the LLM and finishes
    last, so its all-reduce, if any, sets the iteration time."""
    D, M = 2, 2
    spec = ModelSpec(name="v", llm=LLM, encoders=(_vit(frozen, layers=8),))
    params = module_params(spec)
    plan = ParallelPlan(dp=D, llm_pp=1, microbatches=M, encoder_tp={"vision": 1})
    fast = replace(IDEAL, gpus_per_node=plan.gpus_per_replica)  # only the all-reduce is slow
    slow = replace(fast, inter_node_bw=1024.0)
    batch = _batch(
        [0.01] * D * M,
        [0.01] * D * M,
        1,
        {"vision": _units([5.0] * 4, [0.0 if frozen else 5.0] * 4)},
    )
    asg = _one_per_microbatch(batch, D, M)
    base = simulate(batch, asg, spec, plan, fast, record_events=True)
    llm_end = max(e for d, _, _, e in base.events if d.startswith("llm"))
    enc_end = max(e for d, _, _, e in base.events if d.startswith("vision"))
    assert base.iter_time == pytest.approx(max(llm_end, enc_end))
    factor = 2 * (D - 1) / D
    llm_ar = factor * params["llm"] * 2 / slow.inter_node_bw
    enc_ar = factor * params["vision"] * 2 / slow.inter_node_bw
    assert enc_end + enc_ar > llm_end + llm_ar  # the encoder's would be the last to finish
    expected = max(llm_end + llm_ar, enc_end + (0.0 if frozen else enc_ar))
    assert simulate(batch, asg, spec, plan, slow).iter_time == pytest.approx(expected)


def test_mismatched_plan_and_assignment():
    batch = _batch([1.0] * 4, [1.0] * 4, 1)
    asg = _one_per_microbatch(batch, 2, 2)
    with pytest.raises(ValueError, match="D=2"):
        simulate(batch, asg, TEXT, ParallelPlan(dp=1, microbatches=2), IDEAL)
    with pytest.raises(ValueError, match="M=2"):
        simulate(batch, asg, TEXT, ParallelPlan(dp=2, microbatches=4), IDEAL)


def test_plan_must_place_the_batch_encoders():
    M = 2
    batch = _batch([1.0] * M, [1.0] * M, 1, {"vision": _units([1.0] * M, [0.0] * M)})
    with pytest.raises(ValueError, match="vision"):
        simulate(
            batch,
            _one_per_microbatch(batch, 1, M),
            _vision_model(True),
            ParallelPlan(dp=1, microbatches=M),
            IDEAL,
        )


# -------------------------------------------------------------------------------------- scale


def test_scale_smoke():
    spec = load_spec("omni-7b")
    batch = cost_batch(generate_workload("omni", 2048, seed=0), spec)
    plan = ParallelPlan(
        dp=32,
        llm_pp=4,
        llm_tp=4,
        encoder_tp={"vision": 2, "audio": 1},
        encoder_dp={"vision": 4},
        microbatches=32,
    )
    assert plan.world_size == 32 * (4 * 4 + 2 * 4 + 1)
    asg = assign("entrain", batch, plan.dp, plan.microbatches)
    assert asg.violations(batch) == []
    res = simulate(batch, asg, spec, plan, HARDWARE["h100"])
    assert np.isfinite(res.iter_time) and res.iter_time > 0
    assert 0 <= res.bubble_fraction < 1
    assert len(res.busy) == plan.dp * (plan.llm_pp + 4 + 1)  # a device per encoder copy
    assert all(0 <= t < res.iter_time for t in res.busy.values())
    # 2 samples a microbatch: a fourth vision copy can be left without a unit, not the LLM
    assert all(t > 0 for d, t in res.busy.items() if d.startswith(("llm", "audio")))
    assert res.samples == 2048
    assert res.tokens == int(batch.llm_tokens.sum())


# ------------------------------------------------------------ encoder copies, fair per policy


def _two_copy_case():
    """One replica, one microbatch, 4 samples with vision items of 4, 3, 2, 1 seconds (one
    unit each, except sample 0's item, cut in two units of 2), an encoder on 2 copies."""
    units = UnitTable(
        sample=np.array([0, 0, 1, 2, 3]),
        item=np.array([0, 0, 1, 2, 3]),
        tokens=np.full(5, 4, dtype=np.int64),
        llm_tokens=np.full(5, 2, dtype=np.int64),
        fwd=np.array([2.0, 2.0, 3.0, 2.0, 1.0]),
        bwd=np.zeros(5),
    )
    batch = _batch([0.0] * 4, [0.0] * 4, 1, {"vision": units})
    plan = ParallelPlan(dp=1, llm_pp=1, microbatches=1, encoder_tp={"vision": 1},
                        encoder_dp={"vision": 2})  # fmt: skip
    return batch, plan


@pytest.mark.parametrize(
    "rule, copies, busiest",
    [
        # samples dealt in turn: copy 0 gets samples 0, 2 (4 + 2), copy 1 samples 1, 3 (3 + 1)
        ("sample", [0, 0, 1, 0, 1], 6.0),
        # whole items largest first: 4 -> 0, 3 -> 1, 2 -> 1 (3 < 4), 1 -> 0 (4 < 5): 5 and 5
        ("item", [0, 0, 1, 1, 0], 5.0),
        # units largest first: 3 -> 0, 2 -> 1, 2 -> 1 (2 < 3), 2 -> 0 (3 < 4), 1 -> 1 (4 < 5)
        ("unit", [1, 1, 0, 0, 1], 5.0),
    ],
)
def test_each_policy_splits_a_microbatch_over_copies_its_own_way(rule, copies, busiest):
    from entrain.schedule.copies import unit_copies

    batch, plan = _two_copy_case()
    zeros = np.zeros(4, dtype=np.int64)
    asg = Assignment(1, 1, zeros, zeros, {"vision": np.zeros(5, dtype=np.int64)},
                     {"vision": np.zeros(5, dtype=np.int64)}, rule)  # fmt: skip
    assert unit_copies(batch, asg, "vision", 2).tolist() == copies
    res = simulate(batch, asg, _vision_model(True), plan, IDEAL, record_events=True)
    ends = [_events(res, f"vision.c{c}/r0")["F0"] for c in (0, 1)]  # a device per copy
    assert max(end for _, end in ends) == pytest.approx(busiest)
    assert all(start == 0.0 for start, _ in ends)


def test_the_policies_carry_their_copy_rule():
    batch = cost_batch(generate_workload("omni", 64, seed=0), load_spec("omni-7b"))
    rules = {p: assign(p, batch, 2, 4).copy_rule for p in POLICIES}
    coupled = ("sequential", "llm-balanced", "encoder-balanced", "joint")
    assert rules == {**dict.fromkeys(coupled, "sample"), "encoder-rebalance": "item",
                     "entrain": "unit"}  # fmt: skip

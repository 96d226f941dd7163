"""Property tests of every policy: each sample and each unit placed exactly once, precedence
kept, work conserved, and Entrain never worse than `joint` on any module."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entrain.cost import CostedBatch, cost_batch
from entrain.models import load_spec
from entrain.schedule import (
    BASELINES,
    POLICIES,
    Assignment,
    EntrainConfig,
    assign,
    entrain,
    evaluate,
    work,
)
from entrain.schedule.metrics import deferred_tokens, lower_bound
from entrain.workload import ItemTable, Workload

OMNI = load_spec("omni-7b")


@st.composite
def workloads(draw, max_samples: int = 40) -> Workload:
    """Random samples: text-only ones, image/audio/video ones, and samples with nothing."""
    n = draw(st.integers(0, max_samples))
    text = draw(st.lists(st.integers(0, 4000), min_size=n, max_size=n))
    items = {}
    shapes = {
        "image": st.tuples(st.integers(1, 3000), st.integers(1, 3000)),
        "audio": st.tuples(st.floats(0.1, 120.0)),
        "video": st.tuples(st.integers(1, 40), st.integers(28, 800), st.integers(28, 800)),
    }
    for modality, shape in shapes.items():
        counts = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        sizes = draw(st.lists(shape, min_size=sum(counts), max_size=sum(counts)))
        sample = np.repeat(np.arange(n, dtype=np.int64), counts)
        k = {"image": 2, "audio": 1, "video": 3}[modality]
        size = np.asarray(sizes, dtype=np.float64).reshape(-1, k)
        items[modality] = ItemTable(sample, size)
    return Workload(
        ids=[f"s{i}" for i in range(n)], text_tokens=np.asarray(text, np.int64), items=items
    )


shape_args = st.tuples(st.integers(1, 4), st.integers(1, 6))
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_valid(batch: CostedBatch, policy: str, dp: int, m: int) -> None:
    _check_assignment(batch, assign(policy, batch, dp, m), policy)


def _check_assignment(batch: CostedBatch, asg: Assignment, policy: str) -> None:
    assert asg.violations(batch) == [], policy
    # every unit is counted exactly once: per-module work sums to the module's total
    w = work(batch, asg)
    assert np.isclose(w["llm"].sum(), batch.llm_cost.sum(), rtol=1e-9, atol=1e-6)
    for e, u in batch.units.items():
        assert np.isclose(w[e].sum(), u.cost.sum(), rtol=1e-9, atol=1e-6)
        # precedence: a unit is encoded no later than its sample's LLM microbatch
        assert (asg.unit_mb[e] <= asg.sample_mb[u.sample]).all()
    m_ = evaluate(batch, asg)
    assert m_.stretch >= 1.0 - 1e-9
    assert m_.peak_deferred >= 0
    for mod, gap in m_.bound_gap.items():
        assert gap >= -1e-9, (policy, mod, gap)  # nothing beats the lower bound


@pytest.mark.parametrize("policy", list(POLICIES))
@SETTINGS
@given(w=workloads(), shape=shape_args)
def test_every_policy_places_everything_once(policy, w, shape):
    dp, m = shape
    _check_valid(cost_batch(w, OMNI), policy, dp, m)


@SETTINGS
@given(w=workloads(), shape=shape_args)
def test_entrain_never_worse_than_joint(w, shape):
    dp, m = shape
    batch = cost_batch(w, OMNI)
    ours = work(batch, assign("entrain", batch, dp, m))
    theirs = work(batch, assign("joint", batch, dp, m))
    for mod in ours:
        assert ours[mod].max() <= theirs[mod].max() * (1 + 1e-9) + 1e-6, mod


def test_empty_batch_and_text_only():
    empty = Workload(ids=[], text_tokens=np.zeros(0, np.int64))
    text_only = Workload(ids=["a", "b", "c"], text_tokens=np.array([5, 0, 900]))
    for w in (empty, text_only):
        batch = cost_batch(w, OMNI)
        for p in POLICIES:
            _check_valid(batch, p, 2, 3)


def all_deferred(spec) -> tuple[Workload, CostedBatch, Assignment]:
    """Eight samples (six with an image) in 4 microbatches, placed by hand so that
    microbatch 3 holds samples 5 and 6 whose images are both encoded in microbatch 0."""
    w = Workload(
        ids=[f"s{i}" for i in range(8)],
        text_tokens=np.array([4000, 10, 10, 10, 10, 10, 10, 3000]),
        items={"image": ItemTable(np.array([1, 2, 3, 4, 5, 6]), np.full((6, 2), 672.0))},
    )
    batch = cost_batch(w, spec)
    coupled = Assignment.coupled(batch, 1, 4, np.array([0, 0, 1, 1, 2, 3, 3, 2]))
    unit_mb = {
        e: np.where(np.isin(u.sample, [5, 6]), 0, coupled.unit_mb[e])
        for e, u in batch.units.items()
    }
    return w, batch, dataclasses.replace(coupled, unit_mb=unit_mb)


def test_all_deferred_microbatch_is_valid():
    """A microbatch whose samples' units were all encoded earlier is fine (deferral), and
    their embeddings count as held during microbatches 0-2."""
    _, batch, asg = all_deferred(OMNI)
    assert asg.violations(batch) == []
    held = deferred_tokens(batch, asg)
    assert held.shape == (1, 4) and (held[0, :3] > 0).all() and held[0, 3] == 0


def test_metrics_by_hand():
    """Two samples, one replica, two microbatches, coupled by hand: metrics match arithmetic."""
    w = Workload(ids=["a", "b"], text_tokens=np.array([100, 300]))
    batch = cost_batch(w, load_spec("tiny"))
    asg = assign("sequential", batch, 1, 2)
    m = evaluate(batch, asg)
    llm = batch.llm_cost
    mean = llm.mean()
    assert m.cv["llm"] == pytest.approx(np.std(llm) / mean)
    assert m.imbalance["llm"] == pytest.approx(llm.max() / mean)
    assert m.bound_gap["llm"] == pytest.approx(llm.max() / max(llm.sum() / 2, llm.max()) - 1)
    assert m.stretch == pytest.approx(np.mean(llm / mean))  # encoders have no work
    assert lower_bound(batch, 2)["llm"] == pytest.approx(llm.max())
    assert m.peak_deferred == 0


def test_deferred_tokens_by_hand():
    """A unit encoded in microbatch 0 for a sample run in microbatch 2 is held during 0 and 1."""
    w = Workload(
        ids=["a", "b", "c"],
        text_tokens=np.array([10, 10, 10]),
        items={"image": ItemTable(np.array([2]), np.array([[336.0, 336.0]]))},
    )
    batch = cost_batch(w, load_spec("qwen2-vl-7b"))
    asg = Assignment(
        1,
        3,
        np.zeros(3, np.int64),
        np.array([0, 1, 2]),
        {"vision": np.array([0])},
        {"vision": np.array([0])},
    )
    held = deferred_tokens(batch, asg)
    tok = batch.units["vision"].llm_tokens[0]
    assert held.tolist() == [[tok, tok, 0]]


def test_unknown_policy_and_bad_shape():
    batch = cost_batch(Workload(ids=["a"], text_tokens=np.array([1])), OMNI)
    with pytest.raises(ValueError, match="unknown policy"):
        assign("nope", batch, 1, 1)
    with pytest.raises(ValueError, match="dp and microbatches"):
        assign("entrain", batch, 0, 1)


# --- the cap on deferred embedding tokens (EntrainConfig.max_deferred_tokens) ---


def _peak(batch: CostedBatch, asg: Assignment) -> float:
    return float(deferred_tokens(batch, asg).max(initial=0.0))


def _same_assignment(a: Assignment, b: Assignment) -> bool:
    return (
        (a.dp, a.microbatches) == (b.dp, b.microbatches)
        and np.array_equal(a.sample_replica, b.sample_replica)
        and np.array_equal(a.sample_mb, b.sample_mb)
        and a.unit_replica.keys() == b.unit_replica.keys()
        and a.unit_mb.keys() == b.unit_mb.keys()
        and all(np.array_equal(a.unit_replica[e], b.unit_replica[e]) for e in a.unit_replica)
        and all(np.array_equal(a.unit_mb[e], b.unit_mb[e]) for e in a.unit_mb)
    )


def _deferring_batch() -> CostedBatch:
    """Eight samples, images on most: uncapped Entrain defers on one replica x 4 microbatches
    (and on 2 x 4)."""
    sizes = [[845, 2347], [345, 1796], [1332, 2990], [755, 2850], [454, 1944], [1824, 2717]]
    sizes += [[1036, 2725], [2081, 2693], [758, 2323], [2837, 336], [1222, 1982]]
    w = Workload(
        ids=[f"s{i}" for i in range(8)],
        text_tokens=np.array([3148, 1265, 957, 3166, 3505, 317, 234, 2685]),
        items={
            "image": ItemTable(
                np.array([0, 1, 3, 3, 4, 5, 5, 6, 6, 7, 7]), np.asarray(sizes, np.float64)
            )
        },
    )
    return cost_batch(w, OMNI)


lookaheads = st.sampled_from([None, 0, 1, 2])
pools = st.sampled_from([None, 1, 2])


@SETTINGS
@given(
    w=workloads(),
    shape=shape_args,
    lookahead=lookaheads,
    pool=pools,
    kind=st.sampled_from(["zero", "small", "exact", "large"]),
    frac=st.floats(0.0, 0.99),
)
def test_entrain_meets_deferred_token_cap(w, shape, lookahead, pool, kind, frac):
    dp, m = shape
    batch = cost_batch(w, OMNI)
    free = assign("entrain", batch, dp, m, lookahead=lookahead, pool=pool)
    peak = _peak(batch, free)
    cap = {"zero": 0, "small": int(peak * frac), "exact": int(peak), "large": 10**12}[kind]
    asg = assign("entrain", batch, dp, m, lookahead=lookahead, pool=pool, max_deferred_tokens=cap)
    _check_assignment(batch, asg, "entrain")
    held = deferred_tokens(batch, asg)
    assert held.shape == (dp, m) and (held >= 0).all()
    assert held.max(initial=0.0) <= cap
    if cap >= peak:  # a cap that does not bind changes nothing
        assert _same_assignment(asg, free)
    if cap == 0:
        assert not held.any()
    # it is the assignment of the longest lookahead, from the configured one down, that fits
    longest = m - 1 if lookahead is None else min(lookahead, m - 1)
    for la in range(longest, -1, -1):
        cand = assign("entrain", batch, dp, m, lookahead=la, pool=pool)
        if _peak(batch, cand) <= cap:
            assert _same_assignment(asg, cand), la
            break
    # the cap only shortens the lookahead: still never worse than joint on any module
    ours, theirs = work(batch, asg), work(batch, assign("joint", batch, dp, m))
    for mod in ours:
        assert ours[mod].max() <= theirs[mod].max() * (1 + 1e-9) + 1e-6, mod


@SETTINGS
@given(w=workloads(), shape=shape_args, lookahead=lookaheads, pool=pools)
def test_entrain_without_cap_is_unchanged(w, shape, lookahead, pool):
    """max_deferred_tokens=None is the uncapped policy, whichever way it is reached."""
    dp, m = shape
    batch = cost_batch(w, OMNI)
    base = entrain(batch, dp, m, EntrainConfig(lookahead=lookahead, pool=pool))
    for asg in (
        assign("entrain", batch, dp, m, lookahead=lookahead, pool=pool),
        assign("entrain", batch, dp, m, lookahead=lookahead, pool=pool, max_deferred_tokens=None),
        entrain(
            batch, dp, m, EntrainConfig(lookahead=lookahead, pool=pool, max_deferred_tokens=None)
        ),
    ):
        assert _same_assignment(asg, base)
    if lookahead is None and pool is None:
        assert _same_assignment(POLICIES["entrain"](batch, dp, m), base)
        assert _same_assignment(entrain(batch, dp, m), base)


@pytest.mark.parametrize("policy", BASELINES)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=workloads(), shape=shape_args)
def test_baselines_never_defer_and_ignore_cap(policy, w, shape):
    dp, m = shape
    batch = cost_batch(w, OMNI)
    free = assign(policy, batch, dp, m)
    assert _peak(batch, free) == 0, policy
    capped = assign(policy, batch, dp, m, max_deferred_tokens=0)
    assert _same_assignment(capped, free), policy


@pytest.mark.parametrize("dp", [1, 2])
@pytest.mark.parametrize("pool", [None, 1])
def test_deferred_token_cap_binds(dp, pool):
    """On a batch where uncapped Entrain defers, every cap below its peak is met."""
    batch = _deferring_batch()
    free = assign("entrain", batch, dp, 4, pool=pool)
    peak = _peak(batch, free)
    assert peak > 0
    for cap in (0, 1, int(peak) // 2, int(peak) - 1):
        asg = assign("entrain", batch, dp, 4, pool=pool, max_deferred_tokens=cap)
        _check_assignment(batch, asg, "entrain")
        assert _peak(batch, asg) <= cap
    at_peak = assign("entrain", batch, dp, 4, pool=pool, max_deferred_tokens=int(peak))
    assert _same_assignment(at_peak, free)


def test_negative_deferred_token_cap_is_rejected():
    batch = _deferring_batch()
    for policy in POLICIES:
        with pytest.raises(ValueError, match="max_deferred_tokens must be >= 0"):
            assign(policy, batch, 1, 4, max_deferred_tokens=-1)
    with pytest.raises(ValueError, match="max_deferred_tokens must be >= 0"):
        entrain(batch, 1, 4, EntrainConfig(max_deferred_tokens=-5))


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("pool", [None, 2])
def test_units_stay_within_the_policys_replica_pool(policy, pool):
    """What the runtime's channels rely on (schedule.replica_pool)."""
    from entrain.schedule import replica_pool
    from entrain.workload.traces import generate_workload

    block = replica_pool(policy, 4, pool)
    for seed in range(3):
        batch = cost_batch(generate_workload("omni", 64, seed=seed), OMNI)
        asg = assign(policy, batch, 4, 4, None, pool)
        for e, u in batch.units.items():
            home = asg.sample_replica[u.sample] // block
            assert (asg.unit_replica[e] // block == home).all(), (policy, e)

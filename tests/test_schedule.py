"""Property tests of every policy: each sample and each unit placed exactly once, precedence
kept, work conserved, and Entrain never worse than `joint` on any module."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entrain.cost import CostedBatch, cost_batch
from entrain.models import load_spec
from entrain.schedule import POLICIES, assign, evaluate, work
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
    asg = assign(policy, batch, dp, m)
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


def test_all_deferred_microbatch_is_valid():
    """A microbatch whose samples' units were all encoded earlier is fine (deferral)."""
    w = Workload(
        ids=[f"s{i}" for i in range(8)],
        text_tokens=np.array([4000, 10, 10, 10, 10, 10, 10, 3000]),
        items={"image": ItemTable(np.array([1, 2, 3, 4, 5, 6]), np.full((6, 2), 672.0))},
    )
    batch = cost_batch(w, OMNI)
    asg = assign("entrain", batch, 1, 4)
    assert asg.violations(batch) == []
    held = deferred_tokens(batch, asg)
    assert held.shape == (1, 4) and (held >= 0).all()


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
    from entrain.schedule import Assignment

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

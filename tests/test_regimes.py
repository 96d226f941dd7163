"""The wide and narrow regimes of docs/design.md section 6 on the generated traces, through the
same `analyze` path the CLI uses. These are the claims the README tables show."""

from __future__ import annotations

import numpy as np
import pytest

from entrain.analyze import AnalyzeConfig, analyze
from entrain.cost import cost_batch
from entrain.models import load_spec
from entrain.schedule import BASELINES, assign, work
from entrain.workload.manifest import iter_batches
from entrain.workload.traces import TRACE_MODELS, write_trace

ITERATIONS = 4
GLOBAL_BATCH = 512


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("traces")
    out = {}
    for kind in TRACE_MODELS:
        path = root / f"{kind}.jsonl"
        write_trace(kind, ITERATIONS * GLOBAL_BATCH, seed=0, path=path)
        out[kind] = path
    return out


@pytest.mark.parametrize("kind", ["interleaved", "omni"])
def test_wide_regime(traces, kind):
    cfg = AnalyzeConfig(dp=4, microbatches=8, global_batch=GLOBAL_BATCH, iterations=ITERATIONS)
    res = analyze(traces[kind], load_spec(TRACE_MODELS[kind]), cfg)
    pol = res["policies"]
    ours = pol["entrain"]
    assert res["iterations"] == ITERATIONS
    assert pol["sequential"]["worst_cv"] >= 10 * ours["worst_cv"], res["cv_reduction"]
    for b in BASELINES:
        assert ours["worst_cv"] < pol[b]["worst_cv"], b
    for module, gap in ours["bound_gap"].items():
        assert gap <= 0.05, (module, gap)


@pytest.mark.parametrize("kind", list(TRACE_MODELS))
def test_narrow_regime_stretch_is_lowest(traces, kind):
    cfg = AnalyzeConfig(dp=8, microbatches=32, global_batch=GLOBAL_BATCH, iterations=ITERATIONS)
    pol = analyze(traces[kind], load_spec(TRACE_MODELS[kind]), cfg)["policies"]
    for b in BASELINES:
        assert pol["entrain"]["stretch"] <= pol[b]["stretch"], (
            b,
            pol[b]["stretch"],
            pol["entrain"]["stretch"],
        )


@pytest.mark.parametrize("kind", list(TRACE_MODELS))
@pytest.mark.parametrize("shape", [(4, 8), (8, 32)])
def test_entrain_never_worse_than_joint_on_traces(traces, kind, shape):
    spec = load_spec(TRACE_MODELS[kind])
    for w in iter_batches(traces[kind], GLOBAL_BATCH):
        batch = cost_batch(w, spec)
        ours = work(batch, assign("entrain", batch, *shape))
        theirs = work(batch, assign("joint", batch, *shape))
        for module in ours:
            assert ours[module].max() <= theirs[module].max() * (1 + 1e-9), (module, kind)
            assert np.isclose(ours[module].sum(), theirs[module].sum())

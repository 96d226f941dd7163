"""The static planner, the dynamic oracle, the memory model, macro statistics (plan/) and
the Chrome trace of a simulated iteration (report/trace.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from entrain.cost.batch import CostedBatch, cost_batch
from entrain.cost.hardware import HARDWARE
from entrain.models.load import load_spec
from entrain.models.spec import ModelSpec, TransformerSpec
from entrain.plan.macro import ratio_cv
from entrain.plan.memory import plan_memory
from entrain.plan.planner import Planner, PlannerConfig, enumerate_plans
from entrain.report.trace import chrome_trace, write_chrome_trace
from entrain.schedule import assign
from entrain.schedule.parallel import ParallelPlan
from entrain.sim.simulator import simulate
from entrain.workload.traces import generate_workload


@pytest.fixture(scope="module")
def omni():
    return load_spec("omni-7b")


@pytest.fixture(scope="module")
def omni_batches(omni) -> list[CostedBatch]:
    w = generate_workload("omni", 3 * 128, seed=0)
    return [cost_batch(w.slice(i * 128, (i + 1) * 128), omni) for i in range(3)]


@pytest.fixture(scope="module")
def planned(omni, omni_batches):
    cfg = PlannerConfig(gpus=16, global_batch=128, microbatch_samples=4)
    return Planner(omni, omni_batches, HARDWARE["h100"], cfg, simulate=simulate).plan()


# ------------------------------------------------------------------------------ enumeration


@pytest.mark.parametrize("gpus", [4, 8, 16, 24])
@pytest.mark.parametrize("gpus_per_node", [8, 4])
def test_enumerate_plans_use_all_gpus(omni, gpus, gpus_per_node):
    cfg = PlannerConfig(gpus=gpus, global_batch=256, microbatch_samples=8, tp_options=(1, 2, 4, 8))
    plans = enumerate_plans(omni, cfg, gpus_per_node)
    assert plans
    assert len({p.describe() for p in plans}) == len(plans)  # no duplicates
    for p in plans:
        assert p.world_size == gpus, p.describe()
        assert p.llm_tp <= gpus_per_node and p.llm_tp in cfg.tp_options
        assert p.llm_pp <= omni.llm.num_hidden_layers
        assert set(p.encoder_tp) == {"vision", "audio"}
        assert all(1 <= tp <= gpus_per_node for tp in p.encoder_tp.values())
        assert set(p.encoder_dp) <= set(p.encoder_tp)
        assert p.dp <= cfg.global_batch
        assert p.microbatches == max(1, round(cfg.global_batch / p.dp / cfg.microbatch_samples))


def test_enumerate_plans_text_only():
    spec = ModelSpec(
        name="t",
        llm=TransformerSpec(
            hidden_size=8, num_hidden_layers=4, num_attention_heads=2, intermediate_size=16
        ),
    )
    cfg = PlannerConfig(gpus=8, global_batch=64, tp_options=(1, 2, 4, 8))
    plans = enumerate_plans(spec, cfg, 8)
    assert plans
    assert all(p.encoder_tp == {} and p.dp * p.llm_pp * p.llm_tp == 8 for p in plans)
    assert all(p.llm_pp <= 4 for p in plans)
    # every factorization dp x pp x tp of 8 with pp <= 4 layers appears
    assert {(p.dp, p.llm_pp, p.llm_tp) for p in plans} == {
        (d, pp, tp)
        for d in (1, 2, 4, 8)
        for pp in (1, 2, 3, 4)
        for tp in (1, 2, 4, 8)
        if d * pp * tp == 8
    }


# ----------------------------------------------------------------------------------- memory


TOKENS = {"llm": 8192.0, "vision": 16384.0, "audio": 3000.0}


def _plan(**kw) -> ParallelPlan:
    base = {"dp": 2, "microbatches": 8, "encoder_tp": {"vision": 1, "audio": 1}}
    return ParallelPlan(**{**base, **kw})


def test_memory_falls_with_pipeline_and_tensor_parallelism(omni):
    by_pp = [plan_memory(omni, _plan(llm_pp=p), TOKENS)["llm"] for p in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(by_pp, by_pp[1:])), by_pp
    by_tp = [plan_memory(omni, _plan(llm_tp=t), TOKENS)["llm"] for t in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(by_tp, by_tp[1:])), by_tp
    # more tokens per microbatch, or deferred embeddings, cost memory
    more = {**TOKENS, "llm": 2 * TOKENS["llm"]}
    assert plan_memory(omni, _plan(), more)["llm"] > plan_memory(omni, _plan(), TOKENS)["llm"]
    deferred = plan_memory(omni, _plan(), TOKENS, deferred_tokens=1e5)["llm"]
    assert deferred > plan_memory(omni, _plan(), TOKENS)["llm"]
    # the optimizer states are sharded over data parallelism
    assert plan_memory(omni, _plan(dp=8), TOKENS)["llm"] < plan_memory(omni, _plan(), TOKENS)["llm"]


def test_memory_frozen_encoder_needs_less(omni):
    vision, audio = omni.encoders
    frozen = replace(omni, encoders=(replace(vision, frozen=True), audio))
    trained_mem = plan_memory(omni, _plan(), TOKENS)
    frozen_mem = plan_memory(frozen, _plan(), TOKENS)
    assert frozen_mem["vision"] < trained_mem["vision"]
    assert frozen_mem["audio"] == pytest.approx(trained_mem["audio"])
    assert set(trained_mem) == {"vision", "audio", "llm"}
    # encoder tensor parallelism and copies split an encoder's memory
    split = plan_memory(omni, _plan(encoder_tp={"vision": 2, "audio": 1}), TOKENS)
    assert split["vision"] < trained_mem["vision"]


# ---------------------------------------------------------------------------------- planner


def test_planner_static_vs_oracle(planned, omni_batches):
    res = planned
    assert 0 < res.static_over_oracle <= 1 + 1e-9
    assert len(res.oracle_times) == len(res.static.iter_times) == len(omni_batches)
    for oracle, static in zip(res.oracle_times, res.static.iter_times):
        assert 0 < oracle <= static
    assert any(res.static is e for e in res.simulated)
    assert res.samples == [128, 128, 128]
    assert res.static.plan.world_size == 16
    layouts = {  # the simulated plans without Entrain's variants
        replace(
            e.plan, encoder_lookahead=None, encoder_pool=None, encoder_order="light-first"
        ).describe()
        for e in res.simulated
    }
    assert res.feasible >= len(layouts) > 1
    assert res.static_throughput == pytest.approx(sum(res.samples) / sum(res.static.iter_times))
    # the oracle's choice is the fastest simulated plan on each batch
    for i, t in enumerate(res.oracle_times):
        assert t == min(e.iter_times[i] for e in res.simulated)


def test_planner_to_dict_round_trips(planned):
    d = planned.to_dict()
    for key in ("plan", "throughput", "oracle_throughput", "static_over_oracle", "per_batch"):
        assert key in d
    assert d["static_over_oracle"] == pytest.approx(
        d["throughput"]["samples_per_s"] / d["oracle_throughput"]["samples_per_s"]
    )
    assert len(d["per_batch"]) == 3
    for row in d["per_batch"]:
        assert row["oracle_iter_time"] <= row["static_iter_time"]
    again = ParallelPlan.from_dict(json.loads(json.dumps(d))["plan"])
    assert again == planned.static.plan
    assert again.describe() == planned.static.plan.describe()


def test_planner_iter_times_match_simulator(planned, omni, omni_batches):
    """The planner's numbers are the simulator's, under the plan's own deferral knobs."""
    plan = planned.static.plan
    planner = Planner(
        omni,
        omni_batches,
        HARDWARE["h100"],
        PlannerConfig(gpus=16, global_batch=128),
        simulate=simulate,
    )
    for i, b in enumerate(omni_batches):
        asg = planner.assignment(i, plan, "entrain")
        assert asg.violations(b) == []
        t = simulate(b, asg, omni, plan, HARDWARE["h100"]).iter_time
        assert t == pytest.approx(planned.static.iter_times[i])


def _planner(omni, batches, gpus: int, global_batch: int, **cfg) -> Planner:
    config = PlannerConfig(gpus=gpus, global_batch=global_batch, **cfg)
    return Planner(omni, batches, HARDWARE["h100"], config, simulate=simulate)


@pytest.mark.parametrize("gpus", [16, 64, 256, 1024])
def test_search_is_whole_up_to_1024_gpus_at_the_default_sizes(omni, gpus):
    """16 samples per GPU, 4 batches: every shortlisted plan with every Entrain variant, and
    the oracle's extras, are simulated, as before the search could be narrowed."""
    pool = cost_batch(generate_workload("omni", 16 * gpus, seed=2), omni)
    search = _planner(omni, [pool] * 4, gpus, 16 * gpus).search()
    assert search.narrowed is None and search.seconds <= PlannerConfig.search_budget
    per_plan = len(PlannerConfig.entrain_variants)
    assert search.n_static == PlannerConfig.shortlist * per_plan
    assert len(search.plans) >= min(search.feasible, PlannerConfig.shortlist) * per_plan
    assert search.simulations == 4 * len(search.plans)


def test_a_search_over_budget_keeps_the_best_ranked_plans(omni, omni_batches):
    whole = _planner(omni, omni_batches, 16, 128, microbatch_samples=4).search()
    v = len(PlannerConfig.entrain_variants)
    ranked = whole.plans[: whole.n_static]  # the shortlist in rank order, v variants each
    # a budget that fits the 3 best-ranked plans with all their variants, and no more
    top3 = ranked[: 3 * v]
    planner = _planner(omni, omni_batches, 16, 128, microbatch_samples=4)
    planner.cfg.search_budget = planner.search_seconds(top3)
    cut = planner.search()
    assert [p.describe() for p in cut.plans] == [p.describe() for p in top3]
    assert cut.n_static == 3 * v and cut.seconds <= planner.cfg.search_budget < whole.seconds
    assert cut.narrowed.startswith(f"--gpus 16: the whole search ({len(whole.plans)} plans on 3 ")
    assert "narrowed to the 3 best-ranked plan(s) by the closed-form estimate" in cut.narrowed
    res = planner.plan(search=cut)
    assert res.static.plan in top3 and len(res.simulated) == 3 * v and res.narrowed == cut.narrowed
    # no budget at all: the best-ranked plan with the first variant, and it says so
    planner.cfg.search_budget = 0.0
    least = planner.search()
    assert [p.describe() for p in least.plans] == [ranked[0].describe()]
    assert f"1 of {v} Entrain variants" in least.narrowed and "still roughly" in least.narrowed


def test_a_search_for_100000_gpus_is_narrowed(omni):
    """The planner's own estimate says the whole search would take hours; what it keeps is
    a fraction, and the search itself (enumeration, memory, ranking) takes seconds."""
    pool = cost_batch(generate_workload("omni", 20_000, seed=3), omni)
    planner = _planner(omni, [pool], 100_000, 20_000)
    search = planner.search()
    assert search.layouts > search.feasible > 0
    assert search.narrowed.startswith("--gpus 100000: the whole search (")
    assert len(search.plans) < PlannerConfig.shortlist * len(PlannerConfig.entrain_variants)
    assert search.seconds <= planner.cfg.search_budget


def test_planner_nothing_fits(omni, omni_batches):
    hw = replace(HARDWARE["h100"], memory_bytes=1e6)
    cfg = PlannerConfig(gpus=16, global_batch=128, microbatch_samples=4)
    with pytest.raises(ValueError, match="memory"):
        Planner(omni, omni_batches, hw, cfg, simulate=simulate).plan()


def test_planner_needs_batches(omni):
    with pytest.raises(ValueError):
        Planner(
            omni, [], HARDWARE["h100"], PlannerConfig(gpus=8, global_batch=8), simulate=simulate
        )


def test_planner_config_rejects_nonsense():
    with pytest.raises(ValueError):
        PlannerConfig(gpus=0, global_batch=8)
    with pytest.raises(ValueError):
        PlannerConfig(gpus=8, global_batch=8, microbatch_samples=0)


# ------------------------------------------------------------------------------------ macro


def test_ratio_cv_shrinks_like_inverse_sqrt(omni):
    pool = cost_batch(generate_workload("omni", 8192, seed=1), omni)
    cv = ratio_cv(pool, [16, 256, 512, 10**6], draws=256)
    assert set(cv) == {16, 256, 512}  # sizes beyond the pool are skipped
    for e in ("vision", "audio"):
        assert cv[16][e] > cv[256][e] > cv[512][e] > 0
        assert 2 < cv[16][e] / cv[256][e] < 8  # sqrt(256/16) = 4
    # reproducible
    assert ratio_cv(pool, [64], draws=16, seed=3) == ratio_cv(pool, [64], draws=16, seed=3)


# ------------------------------------------------------------------------------------ trace


def test_chrome_trace(omni, omni_batches, tmp_path):
    plan = ParallelPlan(dp=2, llm_pp=2, microbatches=4, encoder_tp={"vision": 1, "audio": 1})
    b = omni_batches[0]
    res = simulate(b, assign("entrain", b, 2, 4), omni, plan, HARDWARE["h100"], record_events=True)
    assert res.events
    trace = chrome_trace(res.events, name="entrain")
    events = trace["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == len(res.events)
    for e in slices:
        assert e["ts"] >= 0 and e["dur"] >= 0
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int)
        assert e["name"][0] in "FB" and e["cat"] == e["name"][0]
        assert e["pid"] == int(e["args"]["device"].rsplit("/r", 1)[1])
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert {(e["pid"], e["tid"]) for e in slices} == set(names)
    assert set(names.values()) == {"vision", "audio", "llm.s0", "llm.s1"}
    procs = {e["pid"] for e in events if e["name"] == "process_name"}
    assert procs == {0, 1}
    # one thread per device: slices on one thread never overlap
    by_thread: dict = {}
    for e in slices:
        by_thread.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    for spans in by_thread.values():
        spans.sort()
        assert all(a[1] <= b[0] + 1e-6 for a, b in zip(spans, spans[1:]))
    assert max(end for s in by_thread.values() for _, end in s) <= res.iter_time * 1e6 + 1e-6

    path = tmp_path / "trace.json"
    write_chrome_trace(res.events, path)
    loaded = json.loads(path.read_text())
    assert loaded["traceEvents"] == json.loads(json.dumps(trace["traceEvents"]))
    assert np.isclose(
        max(e["ts"] + e["dur"] for e in loaded["traceEvents"] if e["ph"] == "X"),
        max(end for *_, end in res.events) * 1e6,
    )


@pytest.mark.parametrize("model", ["omni-7b", "qwen2-vl-7b", "tiny"])
@pytest.mark.parametrize("gpus", [4, 12, 32])
def test_the_runtime_accepts_every_plan_the_planner_emits(model, gpus):
    """With its defaults the planner enumerates only layouts `entrain train` runs: every one
    maps onto ranks (encoder copies included) without the runtime refusing it."""
    from entrain.models import load_spec
    from entrain.program.transfers import roles

    spec = load_spec(model)
    plans = enumerate_plans(spec, PlannerConfig(gpus=gpus, global_batch=256), 8)
    assert plans
    encoders = [e.name for e in spec.encoders]
    for p in plans:
        assert len(roles(p, encoders)) == gpus, p.describe()

"""Entrain's microbatch order (EntrainConfig.order, schedule/hierarchical.py step 5):
every order gives valid assignments under every lookahead and pool; light-first and
heavy-first sort each replica's LLM work up and down; balanced keeps encoder-rebalance's
LLM packing and never a busier encoder microbatch; the knob is checked and carried by
assign, ParallelPlan, the train config, `entrain plan`'s train flags, the sampler and the
planner, which tries every order and so is never slower than encoder-rebalance's plan."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from cli_helpers import run_user_error

from entrain.cli import build_parser
from entrain.cli_plan import train_flags
from entrain.cli_train import train_config
from entrain.config import ConfigError, TrainConfig
from entrain.cost.batch import CostedBatch, cost_batch
from entrain.cost.hardware import HARDWARE
from entrain.data import EntrainBatchSampler
from entrain.models.load import load_spec
from entrain.plan.planner import Planner, PlannerConfig
from entrain.planning import policy_planners
from entrain.schedule import (
    ORDERS,
    POLICIES,
    Assignment,
    EntrainConfig,
    assign,
    check_order,
    entrain,
    replica_pool,
    work,
)
from entrain.schedule.parallel import ParallelPlan
from entrain.sim.simulator import simulate
from entrain.workload.traces import TRACE_MODELS, generate_workload

KINDS = ("omni", "interleaved")
SMOOTH = EntrainConfig().smooth


def _batch(kind: str, n: int, seed: int) -> CostedBatch:
    return cost_batch(generate_workload(kind, n, seed=seed), load_spec(TRACE_MODELS[kind]))


@pytest.fixture(scope="module")
def batches() -> dict[str, list[CostedBatch]]:
    """Small batches of each trace: 96 samples, two seeds."""
    return {kind: [_batch(kind, 96, seed) for seed in (0, 1)] for kind in KINDS}


def _same(a: Assignment, b: Assignment) -> bool:
    return (
        (a.dp, a.microbatches, a.copy_rule) == (b.dp, b.microbatches, b.copy_rule)
        and np.array_equal(a.sample_replica, b.sample_replica)
        and np.array_equal(a.sample_mb, b.sample_mb)
        and a.unit_replica.keys() == b.unit_replica.keys() == a.unit_mb.keys() == b.unit_mb.keys()
        and all(np.array_equal(a.unit_replica[e], b.unit_replica[e]) for e in a.unit_replica)
        and all(np.array_equal(a.unit_mb[e], b.unit_mb[e]) for e in a.unit_mb)
    )


def _levels(batch: CostedBatch, asg: Assignment) -> np.ndarray:
    """(D, M) level of each microbatch's LLM work, in steps of `smooth` of the mean
    microbatch, as hierarchical._order_slots sorts them."""
    llm = work(batch, asg)["llm"]
    mean = max(float(llm.mean()), 1e-300)
    return np.floor(llm / (SMOOTH * mean)).astype(np.int64).reshape(asg.dp, asg.microbatches)


# ------------------------------------------------------------------- 1. every order is valid


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("order", ORDERS)
def test_every_order_places_everything_under_every_lookahead_and_pool(batches, order, kind):
    for batch in batches[kind]:
        for dp in (1, 2, 4):
            for M in (1, 3, 8):
                for lookahead in (None, 0, 1):
                    for pool in (None, 1):
                        case = (order, kind, dp, M, lookahead, pool)
                        asg = assign("entrain", batch, dp, M, lookahead, pool, order=order)
                        assert asg.violations(batch) == [], case
                        assert (asg.dp, asg.microbatches) == (dp, M), case
                        # every sample and every unit placed once: each module's work is whole
                        w = work(batch, asg)
                        assert w["llm"].sum() == pytest.approx(batch.llm_cost.sum(), rel=1e-9)
                        for e, u in batch.units.items():
                            assert w[e].sum() == pytest.approx(u.cost.sum(), rel=1e-9), case
                            late = asg.unit_mb[e] > asg.sample_mb[u.sample]
                            assert not late.any(), case
                            ahead = asg.sample_mb[u.sample] - asg.unit_mb[e]
                            if lookahead is not None:
                                assert (ahead <= lookahead).all(), case
                            # no unit leaves its sample's block of pooled replicas
                            block = replica_pool("entrain", dp, pool)
                            home = asg.sample_replica[u.sample] // block
                            assert (asg.unit_replica[e] // block == home).all(), case
                            if pool == 1:
                                assert np.array_equal(
                                    asg.unit_replica[e], asg.sample_replica[u.sample]
                                ), case


# ---------------------------------------------------- 2. light-first up, heavy-first down


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("order, sign", [("light-first", 1), ("heavy-first", -1)])
def test_llm_work_rises_or_falls_within_each_replica(batches, order, sign, kind):
    """Within a replica, the level of LLM work (floor(load / (smooth * mean))) never falls
    (light-first) or never rises (heavy-first) from one microbatch to the next."""
    for batch in batches[kind]:
        for dp in (1, 2, 4):
            for M in (3, 8):
                for lookahead in (None, 0):
                    for pool in (None, 1):
                        asg = assign("entrain", batch, dp, M, lookahead, pool, order=order)
                        # the level of microbatch k of replica r, in the order it runs
                        level = _levels(batch, asg)
                        steps = np.diff(level, axis=1) * sign
                        assert (steps >= 0).all(), (order, kind, dp, M, lookahead, pool, level)


@pytest.mark.parametrize("kind", KINDS)
def test_heavy_first_keeps_the_guarantee_over_joint(batches, kind):
    """Step 4 holds for heavy-first as for light-first: no module's busiest microbatch is
    busier than under `joint`. (Balanced is bounded by encoder-rebalance instead.)"""
    for batch in batches[kind]:
        for dp in (1, 2, 4):
            for M in (1, 3, 8):
                theirs = work(batch, assign("joint", batch, dp, M))
                for lookahead, pool in ((None, None), (0, None), (1, 1)):
                    asg = assign("entrain", batch, dp, M, lookahead, pool, order="heavy-first")
                    ours = work(batch, asg)
                    case = (dp, M, lookahead, pool)
                    for mod in ours:
                        bound = theirs[mod].max() * (1 + 1e-9) + 1e-6
                        assert ours[mod].max() <= bound, (mod, case)


def test_heavy_first_is_not_light_first(batches):
    """The knob does something: on these batches the two orders run different microbatches
    first, the heavier (by LLM work) under heavy-first."""
    batch = batches["omni"][0]
    light = _levels(batch, assign("entrain", batch, 2, 8, order="light-first"))
    heavy = _levels(batch, assign("entrain", batch, 2, 8, order="heavy-first"))
    assert (heavy[:, 0] > light[:, 0]).all() and (heavy[:, -1] < light[:, -1]).all()


# --------------------------------------------------------------------------- 3. balanced


@pytest.mark.parametrize("kind", KINDS)
def test_balanced_keeps_encoder_rebalances_llm_and_never_a_busier_encoder(batches, kind):
    more = [_batch(kind, 64, seed) for seed in (5, 6)]
    for batch in [*batches[kind], *more]:
        for dp in (1, 2, 4):
            for M in (1, 2, 4, 8):
                er = assign("encoder-rebalance", batch, dp, M)
                er_work = work(batch, er)
                for lookahead in (None, 0, 1):
                    # pools that cover every replica: the bound is guaranteed
                    for pool in (None, dp):
                        case = (kind, dp, M, lookahead, pool)
                        asg = assign("entrain", batch, dp, M, lookahead, pool, order="balanced")
                        assert np.array_equal(asg.sample_replica, er.sample_replica), case
                        assert np.array_equal(asg.sample_mb, er.sample_mb), case
                        ours = work(batch, asg)
                        for e in batch.units:
                            assert ours[e].max() <= er_work[e].max() * (1 + 1e-9) + 1e-9, (e, case)
                        assert np.array_equal(ours["llm"], er_work["llm"]), case


@pytest.mark.parametrize("kind", KINDS)
def test_balanced_keeps_the_llm_packing_with_smaller_pools_too(batches, kind):
    for batch in batches[kind]:
        for dp in (2, 4):
            er = assign("encoder-rebalance", batch, dp, 4)
            for pool in (1, 2):
                asg = assign("entrain", batch, dp, 4, None, pool, order="balanced")
                assert np.array_equal(asg.sample_replica, er.sample_replica), (dp, pool)
                assert np.array_equal(asg.sample_mb, er.sample_mb), (dp, pool)


@pytest.mark.parametrize("kind", KINDS)
def test_balanced_without_lookahead_encodes_every_unit_with_its_sample(batches, kind):
    for batch in batches[kind]:
        for dp in (1, 2, 4):
            for M in (2, 8):
                for pool in (None, 1, 2):
                    asg = assign("entrain", batch, dp, M, 0, pool, order="balanced")
                    for e, u in batch.units.items():
                        assert np.array_equal(asg.unit_mb[e], asg.sample_mb[u.sample]), (dp, M)


def test_balanced_moves_encoder_work(batches):
    """Balanced is not encoder-rebalance itself: with deferral it finds encoder placements
    of its own, and on some batch a strictly less busy encoder microbatch."""
    better = False
    for batch in batches["omni"] + batches["interleaved"]:
        for dp, M in ((1, 8), (2, 4), (4, 4)):
            er = work(batch, assign("encoder-rebalance", batch, dp, M))
            ours = work(batch, assign("entrain", batch, dp, M, order="balanced"))
            better |= any(ours[e].max() < er[e].max() * (1 - 1e-6) for e in batch.units)
    assert better


# ------------------------------------------------------------------- 4. checked everywhere


def test_an_unknown_order_is_refused_naming_the_choices(batches):
    batch = batches["omni"][0]
    choices = "light-first, heavy-first, balanced, encoder-first, joint"
    with pytest.raises(ValueError, match=f"must be one of {choices}, got 'sideways'"):
        assign("entrain", batch, 2, 4, order="sideways")
    for policy in POLICIES:  # checked whatever the policy, like max_deferred_tokens
        with pytest.raises(ValueError, match=choices):
            assign(policy, batch, 2, 4, order="sideways")
    with pytest.raises(ValueError, match=choices):
        entrain(batch, 2, 4, EntrainConfig(order="sideways"))
    with pytest.raises(ValueError, match=choices):
        check_order("Heavy-First")
    for order in ORDERS:
        check_order(order)
    assert ORDERS == ("light-first", "heavy-first", "balanced", "encoder-first", "joint")


def test_parallel_plan_checks_describes_and_round_trips_its_order():
    with pytest.raises(ValueError, match="plan.encoder_order must be one of light-first, heavy-"):
        ParallelPlan(dp=1, encoder_order="x")
    with pytest.raises(ValueError, match="encoder_order"):
        ParallelPlan.from_dict({"dp": 2, "encoder_order": "sideways"})
    enc = {"vision": 1, "audio": 1}
    default = ParallelPlan(dp=2, llm_pp=2, encoder_tp=enc, microbatches=4)
    assert default.encoder_order == "light-first"
    assert "order=" not in default.describe()
    for order in ORDERS:
        plan = dataclasses.replace(default, encoder_order=order, encoder_lookahead=1)
        back = ParallelPlan.from_dict(plan.to_dict())
        assert back == plan and back.encoder_order == order
        assert back.describe() == plan.describe()
        if order != "light-first":
            assert plan.describe().endswith(f" ahead=1 order={order} (8 GPUs)")
    # a plan file written before the knob reads as light-first
    old = default.to_dict()
    del old["encoder_order"]
    assert ParallelPlan.from_dict(old) == default


def _parse(*argv: str) -> TrainConfig:
    return train_config(build_parser().parse_args(["train", *argv]))


def test_train_config_checks_and_carries_the_order(capsys):
    assert _parse("--data", "m.jsonl").microbatch_order == "light-first"
    with pytest.raises(ConfigError, match="--microbatch-order must be one of light-first, heavy"):
        _parse("--data", "m.jsonl", "--microbatch-order", "sideways")
    line = run_user_error(capsys, ["train", "--data", "m.jsonl", "--microbatch-order", "sideways"])
    assert "--microbatch-order must be one of light-first, heavy-first, balanced" in line
    assert "'sideways'" in line
    spec = load_spec("omni-7b")
    for order in ORDERS:
        cfg = _parse("--data", "m.jsonl", "--lookahead", "1", "--microbatch-order", order)
        assert cfg.microbatch_order == order
        assert cfg.step_recipe(spec).order == order
        assert cfg.to_recipe()["schedule"]["microbatch_order"] == order
        assert TrainConfig.from_dict(cfg.to_recipe()) == cfg
    # the recipe key and an override reach it too
    cfg = _parse("--data", "m.jsonl", "--lookahead", "0", "schedule.microbatch_order=balanced")
    assert cfg.step_recipe(spec).order == "balanced"


def test_a_step_recipe_assigns_with_its_order(batches):
    """StepRecipe.assign passes the order on to `assign`."""
    spec = load_spec("omni-7b")
    cfg = _parse("--data", "m.jsonl", "--lookahead", "1", "--microbatch-order", "heavy-first")
    recipe = dataclasses.replace(cfg, dp=2, microbatches=8).step_recipe(spec)
    batch = batches["omni"][0]
    want = assign("entrain", batch, 2, 8, 1, None, order="heavy-first")
    assert _same(recipe.assign(batch), want)
    assert not _same(recipe.replace(order="light-first").assign(batch), want)


def test_the_sampler_checks_and_uses_the_order():
    wl = generate_workload("omni", 48, seed=4)
    spec = load_spec("omni-7b")
    kw = dict(global_batch=24, microbatches=4, dp_rank=0, dp_size=2, shuffle=False)
    with pytest.raises(ValueError, match="light-first, heavy-first, balanced"):
        EntrainBatchSampler(wl, spec, order="sideways", **kw)
    for order in ORDERS:
        sampler = EntrainBatchSampler(wl, spec, order=order, **kw)
        assert sampler.recipe.order == order
        idx = np.arange(24)  # no shuffle: step 0 is the first global batch
        asg = assign("entrain", cost_batch(wl.take(idx), spec), 2, 4, order=order)
        want = [idx[(asg.sample_replica == 0) & (asg.sample_mb == k)].tolist() for k in range(4)]
        assert list(sampler)[:4] == want, order


# -------------------------------------------------------------- 5. `entrain plan`'s flags


def test_train_flags_carry_the_order_only_for_entrain():
    base = ParallelPlan(dp=2, llm_pp=2, encoder_tp={"vision": 1}, microbatches=4)
    light = train_flags(base)
    assert light is not None and "--microbatch-order" not in light
    for order in ("heavy-first", "balanced"):
        plan = dataclasses.replace(base, encoder_order=order, encoder_pool=1)
        flags = train_flags(plan)
        assert flags.endswith(f"--pool 1 --microbatch-order {order}")
        assert flags.count("--microbatch-order") == 1
        # and `entrain train` reads them back
        cfg = _parse("--data", "m.jsonl", *flags.split()[flags.split().index("--dp") :])
        assert cfg.microbatch_order == order and cfg.pool == 1
        for policy in ("encoder-rebalance", "joint"):
            other = train_flags(plan, policy=policy)
            assert "--microbatch-order" not in other and other.endswith(f"--policy {policy}")


# ---------------------------------------------------------------- 6. the default is as was


@pytest.mark.parametrize("kind", KINDS)
def test_the_default_order_is_light_first(batches, kind):
    assert EntrainConfig().order == "light-first"
    for batch in batches[kind]:
        for dp in (1, 2, 4):
            for M in (1, 3, 8):
                base = assign("entrain", batch, dp, M)
                assert _same(base, assign("entrain", batch, dp, M, order="light-first"))
                assert _same(base, POLICIES["entrain"](batch, dp, M))
                assert _same(base, entrain(batch, dp, M, EntrainConfig(order="light-first")))
                for la, pool in ((1, None), (0, 1)):
                    assert _same(
                        assign("entrain", batch, dp, M, la, pool),
                        assign("entrain", batch, dp, M, la, pool, order="light-first"),
                    )


# -------------------------------------------------------------------------- 7. the planner


@pytest.fixture(scope="module")
def omni_batches() -> list[CostedBatch]:
    omni = load_spec("omni-7b")
    w = generate_workload("omni", 3 * 128, seed=0)
    return [cost_batch(w.slice(i * 128, (i + 1) * 128), omni) for i in range(3)]


def _planner(batches, **cfg) -> Planner:
    config = PlannerConfig(gpus=16, global_batch=128, **cfg)
    return Planner(load_spec("omni-7b"), batches, HARDWARE["h100"], config, simulate=simulate)


def test_the_planner_tries_every_order(omni_batches):
    variants = PlannerConfig.entrain_variants
    assert {o for *_, o in variants} == set(ORDERS)
    search = _planner(omni_batches, microbatch_samples=4).search()
    assert search.narrowed is None
    assert {p.encoder_order for p in search.plans} == set(ORDERS)
    # each shortlisted plan with each variant
    shortlist = search.plans[: search.n_static]
    got = {(p.encoder_lookahead, p.encoder_pool, p.encoder_order) for p in shortlist}
    assert got == set(variants)
    # another policy's search has no variants: light-first only
    other = _planner(omni_batches, microbatch_samples=4, policy="encoder-rebalance").search()
    assert {p.encoder_order for p in other.plans} == {"light-first"}


def test_the_planner_assigns_with_the_plans_order(omni_batches):
    planner = _planner(omni_batches, microbatch_samples=4)
    base = ParallelPlan(dp=2, llm_pp=6, encoder_tp={"vision": 1, "audio": 1}, microbatches=16)
    batch = omni_batches[1]
    got = {}
    for order in ORDERS:
        plan = dataclasses.replace(base, encoder_lookahead=1, encoder_order=order)
        asg = planner.assignment(1, plan, "entrain")
        assert _same(asg, assign("entrain", batch, 2, 16, 1, None, order=order)), order
        got[order] = asg
        # other policies ignore it
        er = planner.assignment(1, plan, "encoder-rebalance")
        assert _same(er, assign("encoder-rebalance", batch, 2, 16))
    # the cache tells the orders apart
    assert not _same(got["light-first"], got["heavy-first"])
    assert not _same(got["light-first"], got["balanced"])


@pytest.mark.parametrize("microbatch_samples", [4, 2])
def test_entrain_plans_no_slower_than_encoder_rebalance(omni_batches, microbatch_samples):
    cfg = PlannerConfig(gpus=16, global_batch=128, microbatch_samples=microbatch_samples)
    planners = policy_planners(
        load_spec("omni-7b"), omni_batches, HARDWARE["h100"], cfg, ("entrain", "encoder-rebalance")
    )
    ours = planners["entrain"].plan().static_throughput
    theirs = planners["encoder-rebalance"].plan().static_throughput
    assert ours >= theirs * 0.995, (ours, theirs)

"""The step recipe is the one place a step's samples, costs and assignment come from: the
sampler, a seeded analysis, the planner and a run's config agree on it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from entrain.analyze import AnalyzeConfig, analyze
from entrain.config import ConfigError, TrainConfig
from entrain.cost.batch import cost_batch
from entrain.data.sampler import EntrainBatchSampler
from entrain.models.load import load_spec
from entrain.schedule import assign, evaluate
from entrain.schedule.steps import StepRecipe
from entrain.workload.columnar import batch_indices
from entrain.workload.manifest import global_batches, read_manifest, write_manifest
from entrain.workload.traces import generate_workload

SPEC = load_spec("tiny")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    path = tmp_path_factory.mktemp("steps") / "m.jsonl"
    write_manifest(path, generate_workload("llava-instruct", 96, seed=3))
    return path


def test_a_step_is_the_seeded_order_costed_and_assigned():
    w = generate_workload("llava-instruct", 40, seed=1)
    recipe = StepRecipe(SPEC, global_batch=16, dp=2, microbatches=4, seed=5, lookahead=1)
    sb = recipe.step(w, 3)  # epoch 1 (two whole batches an epoch), its second batch
    np.testing.assert_array_equal(sb.indices, batch_indices(40, 3, 16, 5, True))
    assert sb.samples.ids == [w.ids[i] for i in sb.indices]
    direct = cost_batch(w.take(sb.indices), SPEC)
    np.testing.assert_array_equal(sb.batch.llm_cost, direct.llm_cost)
    want = assign("entrain", direct, 2, 4, 1, None)
    np.testing.assert_array_equal(sb.asg.sample_mb, want.sample_mb)
    np.testing.assert_array_equal(sb.asg.sample_replica, want.sample_replica)


def test_a_seeded_analysis_reads_the_batches_a_run_trains_on(manifest):
    """`entrain analyze --seed S` and `entrain plan` see epoch 0 of a run with seed S."""
    recipe = StepRecipe(SPEC, global_batch=32, dp=2, microbatches=2, seed=7)
    w = read_manifest(manifest)
    for step, batch in enumerate(global_batches(manifest, 32, 3, seed=7)):
        assert batch.ids == recipe.step(w, step).samples.ids


def test_analyze_measures_the_recipe_assignment(manifest):
    cfg = AnalyzeConfig(dp=2, microbatches=2, global_batch=32, iterations=1, seed=7,
                        policies=("entrain", "llm-balanced"))  # fmt: skip
    out = analyze(manifest, SPEC, cfg)
    recipe = StepRecipe(SPEC, 32, 2, 2, seed=7)
    sb = recipe.step(read_manifest(manifest), 0)
    assert out["cost_unit"] == "flop"
    assert out["policies"]["entrain"]["worst_cv"] == pytest.approx(
        evaluate(sb.batch, sb.asg).worst_cv
    )


def test_the_sampler_and_a_run_config_build_the_same_recipe(manifest):
    cfg = TrainConfig(data=str(manifest), model="tiny", global_batch=32, dp=2, microbatches=4,
                      seed=11, lookahead=2, pool=1, max_deferred_tokens=500)  # fmt: skip
    sampler = EntrainBatchSampler(
        manifest, "tiny", global_batch=32, microbatches=4, dp_rank=0, dp_size=2, seed=11,
        lookahead=2, pool=1, max_deferred_tokens=500,
    )  # fmt: skip
    assert sampler.recipe == cfg.step_recipe(sampler.spec)
    assert dataclasses.replace(cfg, lookahead=None).step_recipe(SPEC).lookahead is None


def test_an_unresolved_lookahead_cannot_build_steps(manifest):
    cfg = TrainConfig(data=str(manifest), model="tiny", global_batch=32)
    assert cfg.lookahead == "auto"
    with pytest.raises(ConfigError, match="auto"):
        cfg.step_recipe(SPEC)

"""Encoder copies: an encoder on several ranks of a replica, each encoding a share of every
encoder microbatch split by the policy's rule (by sample, item or unit), their gradients
summed with the replicas'; every policy ends the step as the single-process reference does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_helpers import assert_matches_reference, train

from entrain.runtime.demo_data import make_demo_data
from entrain.runtime.setup import TrainConfig
from entrain.schedule import POLICIES

pytestmark = pytest.mark.timeout(600)
TINY_VISION = str(Path(__file__).resolve().parents[1] / "benchmarks" / "tiny-vision.yaml")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("demo"), 40, seed=1)


def test_the_runtime_splits_copies_as_the_simulator_does(demo):
    """The runtime's copy of each unit is schedule/copies.py's, for every policy (the
    simulator times the same split: tests/test_sim.py checks the rules by hand)."""
    from entrain.cost import cost_batch
    from entrain.program.iteration import IterationPlan
    from entrain.runtime.setup import spec_of
    from entrain.schedule import assign
    from entrain.schedule.copies import unit_copies
    from entrain.workload.manifest import read_manifest

    cfg = TrainConfig(data=str(demo), global_batch=10, microbatches=3)
    spec = spec_of(cfg)
    samples = read_manifest(demo).slice(0, 10)
    batch = cost_batch(samples, spec)
    for policy in POLICIES:
        asg = assign(policy, batch, 1, 3)
        plan = IterationPlan.build(batch, asg, spec, 1, samples, copies={"vision": 2})
        want = unit_copies(batch, asg, "vision", 2)
        assert plan.unit_copy["vision"] == want.tolist(), policy
        assert set(want.tolist()) == {0, 1}, policy  # both copies work


@pytest.mark.parametrize("policy", list(POLICIES))
def test_vision_on_two_ranks_equals_the_reference(demo, tmp_path, policy):
    """4 ranks: 2 vision copies, audio, LLM."""
    train(demo, tmp_path, 4, "--encoder-copies", "vision=2", "--policy", policy,
          "--steps", "1", "--global-batch", "10", "--microbatches", "3")  # fmt: skip
    cfg = TrainConfig(data=str(demo), policy=policy, steps=1, global_batch=10, microbatches=3,
                      encoder_copies="vision=2")  # fmt: skip
    assert_matches_reference(tmp_path, cfg)


def test_copies_and_replicas_together(tmp_path):
    """2 replicas x (2 vision copies + LLM): gradients summed over all four vision ranks,
    AdamW state sharded over them, two steps equal to the reference."""
    data = make_demo_data(tmp_path / "data", 24, seed=5, audio_share=0.0)
    train(data, tmp_path / "run", 6, "--model", TINY_VISION, "--dp", "2", "--encoder-copies",
          "vision=2", "--steps", "2", "--global-batch", "8", "--microbatches", "2")  # fmt: skip
    cfg = TrainConfig(data=str(data), model=TINY_VISION, dp=2, steps=2, global_batch=8,
                      microbatches=2, encoder_copies="vision=2")  # fmt: skip
    assert_matches_reference(tmp_path / "run", cfg)


@pytest.mark.parametrize(
    "copies, nproc, says",
    [
        ("vision=2", 3, "3 processes cannot hold dp=1 replicas of [2 vision + 1 audio]"),
        ("video=2", 4, "--encoder-copies names video, which the model has no encoder for"),
        ("vision=0", 4, "--encoder-copies must be ENCODER=N"),
    ],
)
def test_a_layout_the_ranks_cannot_hold_is_one_line(demo, tmp_path, copies, nproc, says):
    res = subprocess.run(
        [sys.executable, "-m", "entrain", "train", "--data", str(demo), "--nproc", str(nproc),
         "--encoder-copies", copies, "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.returncode == 2 and len(lines) == 1 and says in lines[0], res.stderr


@pytest.mark.parametrize("policy", ["entrain", "encoder-rebalance"])
def test_the_copies_share_an_iteration_evenly(policy):
    """LPT gives a microbatch's largest share to one copy; the copies run on their own ranks,
    forwards ahead, so that copy must change from microbatch to microbatch or it carries
    the iteration (before the rotation: ViT-6B, 4 copies, one copy 3x its share)."""
    import numpy as np

    from entrain.cost import cost_batch
    from entrain.models import load_spec
    from entrain.schedule import assign
    from entrain.schedule.copies import unit_copies
    from entrain.workload.traces import generate_workload

    batch = cost_batch(generate_workload("omni", 512, seed=0), load_spec("omni-7b"))
    asg = assign(policy, batch, 4, 32)
    u = batch.units["vision"]
    copy = unit_copies(batch, asg, "vision", 4)
    per_copy = np.bincount(copy, weights=u.cost, minlength=4)
    assert per_copy.max() < 1.25 * per_copy.mean(), per_copy
    # and each microbatch is still split as evenly as LPT splits it
    bins = asg.unit_bin("vision")
    load = np.zeros((asg.n_bins, 4))
    np.add.at(load, (bins, copy), u.cost)
    biggest = np.zeros(asg.n_bins)
    np.maximum.at(biggest, bins, u.cost)
    share = load.sum(axis=1) / 4
    assert (load.max(axis=1) <= np.maximum(biggest, share) * 4 / 3 + 1e-9).all()

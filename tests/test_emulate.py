"""`--device emulate`: the real runtime with no model, each compute sleeping the time the
simulator gives it (runtime/emulate.py, sim/durations.py).

In one process: the simulator's node durations are `op_seconds`' (a path of a one-sample
step adds up by hand), the sleeping autograd function takes its forward and backward
times, and emulated messages are sized one value a row. Under torchrun (8 ranks: 2 replicas
x [vision, audio, 2 LLM stages], omni-7b's spec, a sizes-only manifest): three policies
finish and log, every rank's busy time is the simulated busy time x --time-scale, the step
time is the simulated one x the scale (a loose bound: the test checks correctness, the
benchmark measures the agreement), a run resumes from its checkpoint, and a bad device is
one line before launching.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from entrain.cost.batch import cost_batch
from entrain.cost.hardware import HARDWARE
from entrain.models.load import load_spec
from entrain.program.iteration import IterationPlan
from entrain.program.messages import ACT, EMBED
from entrain.runtime.emulate import EmulatedPlan, busy
from entrain.schedule import assign
from entrain.schedule.parallel import ParallelPlan
from entrain.sim.durations import op_seconds
from entrain.sim.replay import replay_run
from entrain.sim.simulator import simulate
from entrain.workload.traces import generate_workload, write_trace

pytestmark = pytest.mark.timeout(600)

SPEC = load_spec("omni-7b")
FAST = dataclasses.replace(HARDWARE["h100"], latency=0.0, intra_node_bw=1e30, inter_node_bw=1e30)
"""H100 compute with free transfers: a step's time is its computes' alone."""
SCALE = 2.0
LAYOUT = ("--dp", "2", "--pp", "2", "--global-batch", "16", "--microbatches", "4")


# ---------------------------------------------------------------------- in one process


def _plan(dp: int, pp: int, copies: dict[str, int] | None = None) -> ParallelPlan:
    return ParallelPlan(
        dp=dp,
        llm_pp=pp,
        microbatches=2,
        encoder_tp={"vision": 1, "audio": 1},
        encoder_dp=copies or {},
    )


def test_a_one_sample_step_is_the_sum_of_its_op_seconds():
    """One replica, one LLM stage, one microbatch holding the one sample with an image and
    a clip: the step is vision F or audio F (whichever is longer), LLM F and B, then the
    encoders' backwards; with free transfers and no all-reduce (one replica) nothing else."""
    w = generate_workload("omni", 400, seed=3)
    both = next(i for i in range(len(w)) if w.items["image"].sample.tolist().count(i) == 1
                and w.items["audio"].sample.tolist().count(i) == 1)  # fmt: skip
    batch = cost_batch(w.take(np.array([both])), SPEC)
    plan = dataclasses.replace(_plan(1, 1), microbatches=1)
    asg = assign("sequential", batch, 1, 1)
    ops = op_seconds(batch, asg, SPEC, plan, FAST)
    enc_f = max(ops.compute("vision", 0, "F", 0), ops.compute("audio", 0, "F", 0))
    enc_b = max(ops.compute("vision", 0, "B", 0), ops.compute("audio", 0, "B", 0))
    by_hand = enc_f + ops.compute("llm", 0, "F", 0) + ops.compute("llm", 0, "B", 0) + enc_b
    assert simulate(batch, asg, SPEC, plan, FAST).iter_time == pytest.approx(by_hand, rel=1e-12)
    assert ops.compute("llm", 0, "F", 0) == pytest.approx(
        float(batch.llm_fwd[0]) / FAST.flops(), rel=1e-12
    )


def test_the_simulator_times_each_encoder_copy_as_its_own_device():
    """Two vision copies: op_seconds keeps each copy's own time (an emulated copy sleeps
    its share), and so does the simulator, a device per copy as the runtime has a rank per
    copy; the two copies' shares add up to the microbatch's work."""
    w = generate_workload("omni", 32, seed=4)
    batch = cost_batch(w, SPEC)
    asg = assign("entrain", batch, 2, 2, 1)
    ops = op_seconds(batch, asg, SPEC, _plan(2, 2, {"vision": 2}), FAST)
    per_copy = ops.enc_fwd["vision"]  # (bins, copies)
    assert per_copy.shape == (4, 2)
    one = op_seconds(batch, asg, SPEC, _plan(2, 2), FAST).enc_fwd["vision"][:, 0]
    assert np.allclose(per_copy.sum(axis=1), one, rtol=1e-9)  # no call constant in FLOPs
    assert (per_copy.max(axis=1) < one).any()  # the split helps somewhere
    sim = simulate(batch, asg, SPEC, _plan(2, 2, {"vision": 2}), FAST, record_events=True)
    for c in (0, 1):
        forwards = [e for e in sim.events if e[0] == f"vision.c{c}/r0" and e[1] == "F0"]
        assert forwards[0][3] - forwards[0][2] == pytest.approx(per_copy[0, c], rel=1e-12)
    scaled = ops.scaled(3.0)
    assert scaled.compute("vision", 1, "B", 1, copy=1) == 3.0 * ops.compute("vision", 1, "B", 1, 1)
    assert scaled.after_backward("llm") == pytest.approx(3.0 * ops.after_backward("llm"))
    assert ops.reduce["llm"] > 0  # two replicas sum the LLM's gradients


def test_busy_sleeps_its_forward_and_its_backward():
    w = torch.nn.Parameter(torch.tensor(1.0))
    x = torch.zeros(5, 1, requires_grad=True)
    t0 = time.perf_counter()
    y = busy(x, w, 0.05, 0.12)
    t1 = time.perf_counter()
    y.sum().backward()
    t2 = time.perf_counter()
    assert 0.05 <= t1 - t0 < 0.1 and 0.12 <= t2 - t1 < 0.2
    assert float(w.grad) == 5.0 and torch.equal(x.grad, torch.ones(5, 1))


def test_emulated_messages_carry_one_value_a_row():
    w = generate_workload("omni", 16, seed=5)
    batch = cost_batch(w, SPEC)
    asg = assign("sequential", batch, 1, 2)
    it = IterationPlan.build(batch, asg, SPEC, 2, w)
    small = EmulatedPlan.of(it, op_seconds(batch, asg, SPEC, _plan(1, 2), FAST))
    samples = it.llm_mb[(0, 0)]
    rows = sum(it.seq_rows[s] + 4 for s in samples)  # SLACK_ROWS of headroom each
    big, narrow = it.messages, small.messages
    act = np.flatnonzero((narrow.kind == ACT) & (narrow.j == 0))[0]
    assert narrow.ids(act) == tuple(samples) and big.ids(act) == tuple(samples)
    assert narrow.nbytes[act] - 8 * (3 + len(samples) * 4) == 4 * rows
    assert big.nbytes[act] > 1000 * narrow.nbytes[act]  # 3584 values a row
    embed = (narrow.kind == EMBED) & (narrow.encoder == 0)
    assert (narrow.nbytes[embed] < big.nbytes[embed] / 1000).all()


# ------------------------------------------------------------------------ under torchrun


def _entrain(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "entrain", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def _train(manifest: Path, out: Path, policy: str, *args: str) -> subprocess.CompletedProcess:
    res = _entrain(
        "train", "--data", str(manifest), "--model", "omni-7b", "--device", "emulate",
        "--time-scale", str(SCALE), "--nproc", "8", *LAYOUT, "--policy", policy,
        "--out", str(out), "--timeout", "120", *args,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Sizes only, as `entrain trace generate` writes them: no text, no files."""
    path = tmp_path_factory.mktemp("trace") / "omni.jsonl"
    write_trace("omni", 64, 7, path)
    assert "files" not in path.read_text().splitlines()[0]
    return path


POLICIES = ("sequential", "llm-balanced", "entrain")


@pytest.fixture(scope="module")
def runs(manifest, tmp_path_factory) -> dict[str, Path]:
    """Three steps of each policy; entrain's in two launches, the second resuming from the
    checkpoint of the first."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for policy in POLICIES:
        out[policy] = root / policy
        if policy != "entrain":
            _train(manifest, out[policy], policy, "--steps", "3")
    ckpt = out["entrain"] / "checkpoints"
    _train(manifest, out["entrain"], "entrain", "--steps", "2", "--checkpoint-every", "1")
    resumed = _train(manifest, out["entrain"], "entrain", "--steps", "3", "--resume", str(ckpt))
    (root / "resumed.txt").write_text(resumed.stdout + resumed.stderr)
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_trains_three_steps_and_logs_them(runs, policy):
    rows = _metrics(runs[policy])
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["iter_time"] > 0 and r["samples_per_s"] == pytest.approx(16 / r["iter_time"])
        assert len(r["busy"]) == 8 and all(b > 0 for b in r["busy"].values())
        assert np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
    recorded = json.loads((runs[policy] / "config.json").read_text())["config"]["parallel"]
    assert recorded["device"] == "emulate" and recorded["time_scale"] == SCALE


@pytest.mark.parametrize("policy", POLICIES)
def test_each_rank_is_busy_for_its_simulated_computes(runs, policy):
    """Busy time is what the timed computes took: the simulator's busy time of that device
    x the scale (sleeps never end early), plus the runtime's own per-call overheads."""
    rep = replay_run(runs[policy], warmup=0)
    for s in rep.steps:
        for device, simulated in s.simulated_busy.items():
            measured = s.measured_busy[device]
            assert simulated * 0.999 <= measured <= simulated * 1.3 + 0.05, (s.step, device)


@pytest.mark.parametrize("policy", POLICIES)
def test_step_time_is_the_simulated_one_times_the_scale(runs, policy):
    """Loose: the runtime on 2 shared cores adds its own waits and overheads; the benchmark
    (benchmarks/emulate.py) measures how close it gets."""
    rep = replay_run(runs[policy], warmup=1)
    measured = statistics.median(s.measured for s in rep.steady)
    simulated = statistics.median(s.simulated for s in rep.steady)
    assert abs(measured - simulated) <= 0.4 * simulated, (measured, simulated)


def test_a_resumed_emulated_run_continues_from_its_checkpoint(runs):
    out = runs["entrain"]
    said = (out.parent / "resumed.txt").read_text()
    assert "resumed from" in said and "(2 steps done)" in said
    config = json.loads((out / "config.json").read_text())
    assert [s["start_step"] for s in config["segments"]] == [0, 2]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [0, 1, 2]
    assert (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*"))


@pytest.mark.parametrize(
    ("device", "says"),
    [("emulate:nope", "neither a hardware preset"), ("emulate:{bad}", "not a JSON profile")],
)
def test_a_bad_emulated_device_is_one_line_before_launching(manifest, tmp_path, device, says):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = _entrain(
        "train", "--data", str(manifest), "--model", "omni-7b", "--nproc", "8", *LAYOUT,
        "--device", device.format(bad=bad), "--out", str(tmp_path / "run"), timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("entrain: error: --device") and says in lines[0]
    assert not (tmp_path / "run").exists()  # nothing launched

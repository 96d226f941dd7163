"""The real runtime under torchrun (gloo, CPU): parameters after a step equal a
single-process reference for every policy; the loss goes down; awkward batches (empty
microbatches, text-only samples, deferred work) neither hang nor change the result; a rank
that waits too long fails naming what it waited for."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from runtime_helpers import assert_matches_reference, read_scalars, train

from entrain.config import read_run_config
from entrain.cost.hardware import HARDWARE
from entrain.models.load import run_spec
from entrain.runtime.demo_data import make_demo_data
from entrain.runtime.setup import TrainConfig
from entrain.schedule import POLICIES
from entrain.schedule.parallel import ParallelPlan
from entrain.sim.simulator import simulate
from entrain.workload.manifest import read_manifest

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("demo"), 40, seed=1)


@pytest.mark.parametrize("policy", list(POLICIES))
def test_one_step_equals_single_process(demo, tmp_path, policy):
    """3 ranks: vision encoder, audio encoder, one LLM stage; 3 microbatches."""
    train(
        demo,
        tmp_path,
        3,
        "--policy",
        policy,
        "--steps",
        "1",
        "--global-batch",
        "10",
        "--microbatches",
        "3",
    )
    cfg = TrainConfig(data=str(demo), policy=policy, steps=1, global_batch=10, microbatches=3)
    assert_matches_reference(tmp_path, cfg)


def test_two_replicas_two_stages_with_deferral_and_pooling(demo, tmp_path):
    """8 ranks: 2 replicas x (2 encoders + 2 LLM stages); entrain pools encoders across the
    replicas and may run them ahead of the LLM."""
    train(
        demo,
        tmp_path,
        8,
        "--policy",
        "entrain",
        "--steps",
        "2",
        "--global-batch",
        "12",
        "--microbatches",
        "3",
        "--dp",
        "2",
        "--trace",
    )
    cfg = TrainConfig(
        data=str(demo), policy="entrain", steps=2, global_batch=12, microbatches=3, dp=2
    )
    assert_matches_reference(tmp_path, cfg)
    # the messages its ranks sent in the traced (last) step are, one for one, those the
    # simulator times for that step: sender, receiver, key, bytes (the order each sender
    # keeps is the step program's, checked on 50 layouts in tests/test_program.py)
    sent = json.loads((tmp_path / "messages.json").read_text())
    timed = _simulated_messages(tmp_path, 1)
    assert len(sent) == len(timed) > 0
    for rank in {m["src"] for m in sent} | set(timed.src.tolist()):
        ours = [(tuple(m["key"]), m["dst"], m["bytes"]) for m in sent if m["src"] == rank]
        rows = [i for i in range(len(timed)) if timed.src[i] == rank]
        theirs = [(timed.key(i), int(timed.dst[i]), int(timed.nbytes[i])) for i in rows]
        assert sorted(ours) == sorted(theirs), rank
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["p2p_messages"] == len(sent)
    assert rows[-1]["p2p_mb"] * 2**20 == pytest.approx(sum(m["bytes"] for m in sent))


def _simulated_messages(run_dir: Path, step: int):
    """The messages the simulator times for step `step` of a run (its plan and recipe; the
    hardware does not change which messages there are, the run's fp32 wire their bytes)."""
    record = read_run_config(run_dir)
    cfg = record.config
    spec = run_spec(cfg.model, cfg.audio_from, cfg.freeze)
    plan = ParallelPlan.from_dict(record.plan)
    recipe = cfg.step_recipe(spec).replace(dp=plan.dp, microbatches=plan.microbatches)
    sb = recipe.step(read_manifest(cfg.data), step)
    return simulate(sb.batch, sb.asg, spec, plan, HARDWARE["h100"], value_bytes=4).messages


def test_loss_decreases_over_30_steps(demo, tmp_path):
    train(
        demo,
        tmp_path,
        3,
        "--steps",
        "30",
        "--global-batch",
        "8",
        "--microbatches",
        "2",
        "--lr",
        "3e-3",
        "--tensorboard",
    )
    losses = [
        json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    # the TensorBoard events hold the same numbers as metrics.jsonl
    board = read_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in board["loss"]] == list(range(30))
    assert [v for _, v in board["loss"]] == pytest.approx(losses, rel=1e-6)
    assert {"iter_time", "lr", "samples_per_s"} <= set(board)


def test_empty_microbatches_text_only_and_deferral(tmp_path):
    """More microbatches than samples (empty encoder and LLM microbatches), text-only
    samples, and an image-heavy sample whose units entrain encodes early."""
    root = tmp_path / "data"
    manifest = make_demo_data(root, 6, seed=3, audio_share=0.0)
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    for rec in lines[:3]:  # text-only samples
        rec.pop("image", None)
        rec["files"] = {"image": [], "audio": []}
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "run"
    train(
        manifest,
        out,
        3,
        "--steps",
        "1",
        "--global-batch",
        "4",
        "--microbatches",
        "6",
        "--no-shuffle",
        "--allow-empty-microbatches",
    )
    cfg = TrainConfig(data=str(manifest), steps=1, global_batch=4, microbatches=6, shuffle=False,
                      allow_empty_microbatches=True)  # fmt: skip
    assert_matches_reference(out, cfg)


def _waiter(rank: int, init: str, q) -> None:
    from entrain.runtime.comm import Mailbox, Transfer, TransferTimeout

    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30)
    )
    if rank == 0:
        try:
            mail = Mailbox(datetime.timedelta(seconds=2))
            what = "activations of LLM microbatch 3"
            mail.begin([Transfer(("act", 0, 0, 3), 1, 0, (), 64, what)])
            mail.recv(("act", 0, 0, 3))
            q.put("no error")
        except TransferTimeout as e:
            q.put(str(e))
    dist.barrier()
    dist.destroy_process_group()


def test_timeout_names_what_it_waited_for(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = f"file://{tmp_path / 'store'}"
    procs = [ctx.Process(target=_waiter, args=(r, init, q)) for r in range(2)]
    for p in procs:
        p.start()
    msg = q.get(timeout=60)
    for p in procs:
        p.join(timeout=60)
    assert "activations of LLM microbatch 3" in msg and "rank 1" in msg, msg


def test_frozen_encoder_step_equals_single_process(demo, tmp_path):
    """A frozen vision tower runs forward only and sends its trunk's states; its projector
    trains on the first LLM stage. 2 ranks (the demo's audio is left out: tiny-vision)."""
    spec = (Path(__file__).resolve().parents[1] / "benchmarks" / "tiny-vision.yaml").read_text()
    path = tmp_path / "frozen.yaml"
    path.write_text(spec.replace("frozen: false", "frozen: true"))
    from entrain.runtime.demo_data import make_demo_data

    data = make_demo_data(tmp_path / "data", 12, seed=9, audio_share=0.0)
    out = tmp_path / "run"
    train(data, out, 2, "--model", str(path), "--steps", "1", "--global-batch", "6",
          "--microbatches", "3")  # fmt: skip
    cfg = TrainConfig(data=str(data), model=str(path), steps=1, global_batch=6, microbatches=3)
    assert_matches_reference(out, cfg)


def test_plan_ahead_prepares_each_step_once_in_order_from_any_start():
    from entrain.runtime.train import PlanAhead

    calls: list[int] = []

    def prepare(step: int) -> int:
        calls.append(step)
        return step * 10

    ahead = PlanAhead(prepare, 6)
    got = []
    for s in range(2, 6):  # a resumed run; the step's first compute starts the next plan
        got.append(ahead.take(s))
        ahead.start(s + 1)
        ahead.start(s + 1)  # once only
    assert got == [20, 30, 40, 50]
    ahead.close()
    assert calls == [2, 3, 4, 5]  # nothing past the last step


def test_plan_ahead_plans_the_next_step_only_when_asked():
    """Taking a step must not start the next one's plan: it starts after the step's first
    compute, so that no rank plans while others are still in the closing collective."""
    from entrain.runtime.train import PlanAhead

    calls: list[int] = []
    ahead = PlanAhead(lambda s: calls.append(s) or s, 4)
    assert ahead.take(0) == 0
    ahead.close()  # waits for anything submitted
    assert calls == [0]


def test_plan_ahead_raises_a_failed_preparation_in_its_own_step():
    from entrain.runtime.train import PlanAhead

    def prepare(step: int) -> int:
        if step == 1:
            raise ValueError("bad batch 1")
        return step

    ahead = PlanAhead(prepare, 3)
    assert ahead.take(0) == 0
    with pytest.raises(ValueError, match="bad batch 1"):
        ahead.take(1)
    ahead.close()

"""Checkpoint and resume exactly once, a rank killed mid-step, a dead peer, bad input and the
cap on deferred embeddings: run through `entrain train` under torchrun (gloo), as users do."""

from __future__ import annotations

import collections
import datetime
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from runtime_helpers import params

from entrain.runtime import checkpoint
from entrain.runtime.demo_data import make_demo_data

ROOT = Path(__file__).resolve().parents[1]
TINY_VISION = str(ROOT / "benchmarks" / "tiny-vision.yaml")
# 32 samples, 8 a step: one epoch is 4 steps
BASE = ("--model", TINY_VISION, "--global-batch", "8", "--microbatches", "2", "--nproc", "2")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("data"), 32, seed=6, audio_share=0.0)


def train(*args: str, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, "-m", "entrain", "train", *BASE, "--timeout", "60", *args],
        capture_output=True,
        text=True,
        timeout=400,
        env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
    )
    if ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def consumed(out: Path) -> list[tuple[int, str]]:
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    return [(r["step"], s) for r in rows for s in r["samples"]]


# -------------------------------------------------------------------- checkpoint and resume


def test_sigkill_mid_step_then_restart_matches_an_uninterrupted_run(data, tmp_path):
    """Rank 1 is SIGKILLed 10 ms into step 5 of 8 (two epochs); torchrun restarts the ranks,
    which resume from the checkpoint after step 4. The weights end as an uninterrupted
    run's, and the consumption log holds every sample exactly once per epoch."""
    plain = tmp_path / "plain"
    train("--data", str(data), "--steps", "8", "--out", str(plain), "--save-params")
    faulty = tmp_path / "faulty"
    marker = tmp_path / "killed"
    res = train(
        "--data", str(data), "--steps", "8", "--out", str(faulty), "--save-params",
        "--checkpoint-every", "2", "--resume", str(faulty / "ckpt"), "--max-restarts", "1",
        env={"ENTRAIN_FAULT_INJECT": f"5:1:{marker}"},
    )  # fmt: skip
    assert marker.exists(), "the fault never fired"
    assert "resumed from" in res.stdout + res.stderr and "step-00000004" in res.stdout + res.stderr
    a, b = params(plain), params(faulty)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log = consumed(faulty)
    assert sorted({s for s, _ in log}) == list(range(8))
    for epoch in (range(0, 4), range(4, 8)):
        ids = collections.Counter(sid for s, sid in log if s in epoch)
        assert len(ids) == 32 and set(ids.values()) == {1}
    steps = [json.loads(x)["step"] for x in (faulty / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(8))


def test_resume_in_a_second_launch_continues_with_the_samples_not_yet_trained(data, tmp_path):
    full = tmp_path / "full"
    train("--data", str(data), "--steps", "6", "--out", str(full), "--save-params")
    part = tmp_path / "part"
    ckpt = part / "ckpt"
    # stops after 3 steps (mid-epoch), checkpointing every 2 steps and at the end
    train("--data", str(data), "--steps", "3", "--out", str(part), "--checkpoint-every", "2",
          "--resume", str(ckpt))  # fmt: skip
    assert checkpoint.latest(ckpt).name == "step-00000003"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000002", "step-00000003"]
    res = train("--data", str(data), "--steps", "6", "--out", str(part), "--save-params",
                "--checkpoint-every", "2", "--resume", str(ckpt))  # fmt: skip
    assert "3 steps done" in res.stdout
    a, b = params(full), params(part)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert consumed(part) == consumed(full)


def test_a_checkpoint_of_another_layout_is_refused(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    train("--data", str(data), "--steps", "1", "--checkpoint-every", "1", "--resume", str(ckpt))
    res = train("--data", str(data), "--steps", "2", "--resume", str(ckpt), "--microbatches", "4",
                ok=False)  # fmt: skip
    assert res.returncode != 0
    assert "another run layout" in res.stderr and "Traceback" not in res.stderr


def test_latest_skips_a_checkpoint_whose_write_crashed(tmp_path):
    good = tmp_path / "step-00000002"
    good.mkdir()
    (good / ".metadata").write_bytes(b"x")
    half = tmp_path / "step-00000004.tmp"  # a save killed mid-write: never renamed
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"partial")
    no_meta = tmp_path / "step-00000006"  # renamed by hand, metadata missing
    no_meta.mkdir()
    assert checkpoint.latest(tmp_path) == good
    (tmp_path / "latest").write_text("step-00000009\n")  # points at nothing
    assert checkpoint.latest(tmp_path) == good
    (tmp_path / "latest").write_text("step-00000002\n")
    assert checkpoint.latest(tmp_path) == good
    assert checkpoint.latest(tmp_path / "nothing-here") is None


def test_resume_from_an_empty_folder_starts_at_step_zero(data, tmp_path):
    res = train("--data", str(data), "--steps", "1", "--resume", str(tmp_path / "new"))
    assert "no checkpoint in" in res.stdout


# ------------------------------------------------------------------------- a rank that dies


def _lose_peer(rank: int, init: str, q) -> None:
    from entrain.runtime.comm import Mailbox, PeerLost, Transfer

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60)
    )
    if rank == 1:
        time.sleep(0.5)
        os._exit(1)  # dies without a word, mid-iteration
    t0 = time.perf_counter()
    try:
        mail = Mailbox(datetime.timedelta(seconds=60))
        what = "activations of LLM microbatch 2"
        mail.begin([Transfer(("act", 0, 0, 2), 1, 0, (), 64, what)])
        mail.recv(("act", 0, 0, 2))
        q.put(("no error", 0.0))
    except PeerLost as e:
        q.put((str(e), time.perf_counter() - t0))


def test_a_dead_peer_is_named_quickly_not_waited_for(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = f"file://{tmp_path / 'rdzv'}"
    procs = [ctx.Process(target=_lose_peer, args=(r, init, q)) for r in range(2)]
    for p in procs:
        p.start()
    msg, waited = q.get(timeout=90)
    for p in procs:
        p.join(timeout=30)
    assert "lost rank 1" in msg and "activations of LLM microbatch 2" in msg
    assert waited < 30  # well inside the 60 s timeout: the closed connection is noticed


def test_a_rank_killed_without_restarts_ends_the_run_with_an_error(data, tmp_path):
    t0 = time.perf_counter()
    res = train("--data", str(data), "--steps", "4", ok=False,
                env={"ENTRAIN_FAULT_INJECT": f"1:0:{tmp_path / 'm'}"})  # fmt: skip
    assert res.returncode != 0
    assert time.perf_counter() - t0 < 120
    assert "a process of this run failed" in res.stderr
    assert "SIGKILL" in res.stderr  # torchrun's summary names the rank and the signal


# ------------------------------------------------------------------------------- bad input


@pytest.fixture()
def broken(tmp_path) -> Path:
    manifest = make_demo_data(tmp_path / "data", 16, seed=8, audio_share=0.0)
    lines = manifest.read_text().splitlines()
    first_with = [i for i, x in enumerate(lines) if json.loads(x).get("image")]
    img = manifest.parent / json.loads(lines[first_with[0]])["files"]["image"][0]
    img.write_bytes(img.read_bytes()[:40])  # truncated
    entry = json.loads(lines[first_with[1]])
    entry["files"]["image"][0] = "images/nowhere.png"  # missing file
    lines[first_with[1]] = json.dumps(entry)
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_bad_samples_stop_the_run_with_one_clear_message(broken):
    res = train("--data", str(broken), "--steps", "1", ok=False)
    assert res.returncode != 0
    assert "2 bad sample(s)" in res.stderr and "Traceback" not in res.stderr
    assert "nowhere.png" in res.stderr and "cannot decode" in res.stderr
    assert res.stderr.count("2 bad sample(s)") == 1  # printed by rank 0 only


def test_skip_bad_trains_without_them_and_says_so(broken, tmp_path):
    out = tmp_path / "run"
    res = train("--data", str(broken), "--steps", "2", "--skip-bad", "--out", str(out))
    assert "trained without 2 bad sample(s)" in res.stdout
    skipped = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 2
    bad_ids = {s["id"] for s in skipped}
    assert not bad_ids & {sid for _, sid in consumed(out)}


def test_a_sample_over_the_size_cap_is_bad(data):
    res = train("--data", str(data), "--steps", "1", "--max-sample-tokens", "40", ok=False)
    assert "more than --max-sample-tokens 40" in res.stderr


# ------------------------------------------------------------------ the cap on deferred tokens


def test_runtime_holds_no_more_deferred_embeddings_than_the_cap(data, tmp_path):
    """Unlimited lookahead defers; the measured peak of embeddings held for later
    microbatches must then stay within --max-deferred-tokens (and it does defer without)."""
    args = ("--data", str(data), "--steps", "4", "--microbatches", "4", "--lookahead", "unlimited")
    free, capped = tmp_path / "free", tmp_path / "capped"
    train(*args, "--out", str(free))
    cap = 20
    train(*args, "--out", str(capped), "--max-deferred-tokens", str(cap))
    peak = lambda out: [  # noqa: E731
        json.loads(x)["peak_deferred_tokens"]
        for x in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert max(peak(free)) > cap, "no deferral without a cap: the test would prove nothing"
    assert max(peak(capped)) <= cap

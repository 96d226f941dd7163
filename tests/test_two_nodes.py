"""Nothing assumes one node: two torchrun agents on this machine stand for two nodes (one
data-parallel replica each) and train what one agent with all the processes trains; a run
folder that one node does not see stops the run at start in one line; and the ranks wait
for rank 0's check of the data however long it takes, not --timeout."""

from __future__ import annotations

import datetime
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from runtime_helpers import params

from entrain.cli_train import _kill_tree, _launcher_noise_removed
from entrain.config import ConfigError
from entrain.runtime.demo_data import make_demo_data
from entrain.runtime.rundir import SHARED_TOKEN, check_shared
from entrain.runtime.setup import TrainConfig

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
TINY_VISION = str(ROOT / "benchmarks" / "tiny-vision.yaml")
# 2 replicas of (ViT, one LLM stage): ranks 0-1 are replica 0, ranks 2-3 replica 1
# (ParallelPlan lays replicas out contiguously), so each agent of 2 processes holds one
TRAIN = ("--model", TINY_VISION, "--global-batch", "8", "--microbatches", "2", "--dp", "2",
         "--steps", "3", "--timeout", "60", "--save-params")  # fmt: skip
PER_NODE = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("data"), 32, seed=6, audio_share=0.0)


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent(node: int, port: int, data: Path, out: Path) -> subprocess.Popen:
    """One node's torchrun, as a user starts it on each node (no --node-rank: the c10d
    rendezvous ignores it, and says so). Node 0 hosts the rendezvous store."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
           str(PER_NODE), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
           "--rdzv-id", f"two-nodes-{port}", "--rdzv-conf", f"is_host={int(node == 0)}",
           "-m", "entrain", "train", *TRAIN, "--data", str(data), "--out", str(out)]  # fmt: skip
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
        start_new_session=True,
    )  # fmt: skip


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line holds `text` (a run's own tmp folder)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if entry.isdigit() and text.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


def two_nodes(data: Path, out0: Path, out1: Path, timeout: float = 300):
    """Both agents to the end: (their exit codes, their stderr less torchrun's noise as the
    `entrain train` launcher removes it, seconds until both ended)."""
    port = free_port()
    t0 = time.monotonic()
    agents = [agent(0, port, data, out0), agent(1, port, data, out1)]
    try:
        errs = [a.communicate(timeout=timeout)[1] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                _kill_tree(a.pid, signal.SIGKILL)
                a.wait()
        for pid in processes_naming(str(out0)) + processes_naming(str(out1)):
            _kill_tree(pid, signal.SIGKILL)  # only on failure: a rank left behind
    seconds = time.monotonic() - t0
    said = ["".join(_launcher_noise_removed(e.splitlines(keepends=True))) for e in errs]
    return [a.returncode for a in agents], said, seconds


def test_two_nodes_train_exactly_what_one_node_trains(data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    res = subprocess.run(
        [sys.executable, "-m", "entrain", "train", *TRAIN, "--data", str(data), "--out", str(one),
         "--nproc", str(2 * PER_NODE)],
        capture_output=True, text=True, timeout=300, env=env(),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    codes, said, _ = two_nodes(data, two, two)
    assert codes == [0, 0], said
    assert json.loads((two / "config.json").read_text())["world"] == 2 * PER_NODE
    # the same arithmetic in the same order: bit for bit, not within a tolerance
    expected, got = params(one), params(two)
    assert set(got) == set(expected)
    for name, p in expected.items():
        assert torch.equal(got[name], p), name
    losses = [
        [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (one, two)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 3
    grads = torch.load(two / "grads-vision.pt")
    assert any(g.abs().sum() > 0 for g in grads.values())  # the steps did train
    assert not list(two.glob(SHARED_TOKEN + "*"))  # the check's token is gone


def test_an_out_folder_one_node_does_not_see_stops_the_run_at_start(data, tmp_path):
    """Node 1 gets another folder: it stands for a disk only that node mounts."""
    a, b = tmp_path / "node0-disk" / "run", tmp_path / "node1-disk" / "run"
    codes, said, seconds = two_nodes(data, a, b, timeout=120)
    assert all(codes), (codes, said)
    lines = [x for text in said for x in text.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("entrain: error:")]
    assert len(errors) == 1, said  # rank 0 says it once; the other ranks stop quietly
    # which agent holds rank 0 is the rendezvous' choice: the line names its folder
    seen, unseen = (a, b) if f"--out {a} " in errors[0] else (b, a)
    assert f"--out {seen} is not shared by every node: rank 2 (host " in errors[0], errors[0]
    assert f"not see rank 0's {seen}/{SHARED_TOKEN}" in errors[0], errors[0]
    assert f"(it looked for {unseen}/{SHARED_TOKEN}" in errors[0], errors[0]
    # the rest is torchrun's summary, one line per agent (its tracebacks removed)
    assert all(x.startswith("entrain: exit codes") for x in lines if x not in errors), said
    assert seconds < 90, f"the refusal took {seconds:.0f} s"
    assert not processes_naming(str(tmp_path)), "a process of the run was left running"
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no token, no run file


# ------------------------------------------------- the check itself, ranks as threads


def threaded_ranks(world: int, call) -> list:
    """`call(rank, all_gather)` on `world` threads with an all_gather_object between them:
    what each returned, or the exception it raised."""
    barrier = threading.Barrier(world, timeout=30)
    slots: list = [None] * world
    results: list = [None] * world

    def gather(rank: int, every: list, mine: object) -> None:
        slots[rank] = mine
        barrier.wait()
        every[:] = list(slots)
        barrier.wait()

    def run(rank: int) -> None:
        try:
            results[rank] = call(rank, functools.partial(gather, rank))
        except Exception as e:  # noqa: BLE001 (the test compares them)
            results[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_a_checkpoint_folder_one_node_does_not_see_is_named(data, tmp_path):
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    mine = TrainConfig(data=str(data), out=str(out), checkpoint_dir=str(ckpt), checkpoint_every=2)
    other = TrainConfig(data=str(data), out=str(out), checkpoint_dir=str(tmp_path / "local"),
                        checkpoint_every=2)  # fmt: skip
    results = threaded_ranks(
        3, lambda rank, gather: check_shared(other if rank == 2 else mine, rank, 3, gather, 0.2)
    )
    assert all(isinstance(r, ConfigError) for r in results), results
    assert len({str(r) for r in results}) == 1  # every rank stops with the same line
    said = str(results[0])
    assert said.startswith(f"--checkpoint-dir {ckpt} is not shared by every node: rank 2 "), said
    assert "\n" not in said
    # a folder every rank sees passes, and the token goes
    results = threaded_ranks(3, lambda rank, gather: check_shared(mine, rank, 3, gather, 0.2))
    assert results == [None, None, None]
    assert not list(out.iterdir()) and not list(ckpt.iterdir())


# ----------------------------------------------- the data check outlasts --timeout

SLOW_S = 6.0  # three times the ranks' --timeout of 2 s


def _slowly(real, *args, **kwargs):
    time.sleep(SLOW_S)
    return real(*args, **kwargs)


def _check_with_slow_validation(rank: int, init: str, manifest: str, q) -> None:
    from types import SimpleNamespace

    from entrain.models.load import load_spec
    from entrain.runtime import validate
    from entrain.runtime.inputs import load_records
    from entrain.runtime.train import Trainer
    from entrain.workload.manifest import read_manifest

    timeout = datetime.timedelta(seconds=2)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timeout)
    validate.validate_samples = functools.partial(_slowly, validate.validate_samples)
    cfg = TrainConfig(data=manifest, model=TINY_VISION, timeout_s=2, skip_bad=True)
    me = SimpleNamespace(cfg=cfg, rank=rank, spec=load_spec(TINY_VISION), data_codec=None)
    t0 = time.monotonic()
    try:
        bad = Trainer._check_samples(me, load_records(manifest), read_manifest(manifest))
        q.put((rank, "verdict", [b.id for b in bad], time.monotonic() - t0))
    except Exception as e:  # noqa: BLE001 (reported to the test)
        q.put((rank, "failed", f"{type(e).__name__}: {e}"[:500], time.monotonic() - t0))
    # negative control: the same wait inside one collective runs into the timeout (rank 0
    # stays in the group, silent, as long as its check lasted)
    if rank == 0:
        time.sleep(SLOW_S)
    else:
        try:
            dist.broadcast_object_list([None], src=0)
            q.put((rank, "control", "no timeout", 0.0))
        except RuntimeError as e:
            q.put((rank, "control", f"timed out: {str(e)[:200]}", 0.0))
    q.close()
    q.join_thread()  # what was put reaches the test before the exit below
    os._exit(0)  # the control left the group broken: no clean shutdown to wait for


def test_ranks_wait_for_a_data_check_longer_than_the_timeout(tmp_path):
    manifest = make_demo_data(tmp_path / "data", 8, seed=2, audio_share=0.0)
    first = json.loads(manifest.read_text().splitlines()[0])
    image = next(p for p in (tmp_path / "data").rglob("*.png") if p.name in json.dumps(first))
    image.unlink()  # one bad sample: the verdict has something to carry
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    init = f"file://{tmp_path / 'store'}"
    procs = [
        ctx.Process(target=_check_with_slow_validation, args=(r, init, str(manifest), q))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in range(3)]
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    checks = {r: (kind, what, s) for r, kind, what, s in got if kind != "control"}
    assert checks[0][0] == "verdict" and checks[1][0] == "verdict", checks
    assert checks[1][1] == checks[0][1] == [first["id"]], checks
    assert checks[1][2] >= SLOW_S, checks  # rank 1 did wait past its 2 s timeout
    control = next(what for r, kind, what, _ in got if kind == "control" and r == 1)
    assert control.startswith("timed out"), control

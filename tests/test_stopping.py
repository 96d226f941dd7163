"""Stopping a run as users and schedulers do (SIGTERM or SIGINT to `entrain train`, Ctrl-C to
its process group, SIGKILL of the launcher or of torchrun): no process of the run survives,
one line says what stopped and where the last checkpoint is, and that checkpoint resumes
exactly once. Black-box: real launches under torchrun (gloo, 2 ranks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from runtime_helpers import params

from entrain.runtime.demo_data import make_demo_data

ROOT = Path(__file__).resolve().parents[1]
TINY_VISION = str(ROOT / "benchmarks" / "tiny-vision.yaml")
BASE = ("--model", TINY_VISION, "--global-batch", "8", "--microbatches", "2", "--nproc", "2",
        "--timeout", "60")  # fmt: skip
RESUMED_STEPS = 24  # the stopped runs stop within a few steps of the signal, well before


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("data"), 32, seed=6, audio_share=0.0)


def entrain(*args: str) -> list[str]:
    return [sys.executable, "-m", "entrain", "train", *BASE, *args]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc (the ranks run in sessions of their own,
    so process groups do not find them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def start_and_stop(data: Path, out: Path, how: str, *extra: str) -> tuple[int, str, float]:
    """Launch a long run, wait until it has trained 3 steps, stop it `how`; returns the
    launcher's exit code, its stderr and the seconds until no process of the run was left."""
    launcher = subprocess.Popen(
        entrain("--data", str(data), "--out", str(out), "--steps", "400", *extra),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
        start_new_session=True,  # its own process group, as a shell's job
    )
    deadline = time.monotonic() + 120
    while steps_logged(out) < 3:
        assert launcher.poll() is None, launcher.stderr.read()
        assert time.monotonic() < deadline, "the run did not train 3 steps in 120 s"
        time.sleep(0.2)
    run = descendants(launcher.pid) | {launcher.pid}
    torchrun = next(p for p in descendants(launcher.pid) if _is_torchrun(p))
    t0 = time.monotonic()
    if how == "sigterm":
        launcher.send_signal(signal.SIGTERM)
    elif how == "sigint":
        launcher.send_signal(signal.SIGINT)
    elif how == "ctrl-c":  # what a terminal does: SIGINT to the foreground process group
        os.killpg(launcher.pid, signal.SIGINT)
    elif how == "kill-launcher":
        launcher.kill()
    elif how == "kill-torchrun":
        os.kill(torchrun, signal.SIGKILL)
    _, err = launcher.communicate(timeout=60)
    while any(alive(p) for p in run) and time.monotonic() - t0 < 30:
        time.sleep(0.1)
    gone = time.monotonic() - t0
    assert not [p for p in run if alive(p)], f"{how}: processes of the run still alive"
    return launcher.returncode, err, gone


def _is_torchrun(pid: int) -> bool:
    try:
        return b"torch.distributed.run" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("full")
    res = subprocess.run(
        entrain(
            "--data", str(data), "--out", str(out), "--steps", str(RESUMED_STEPS), "--save-params"
        ),  # fmt: skip
        capture_output=True,
        text=True,
        timeout=400,
        env=env(),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return params(out)


def resume_matches(data: Path, out: Path, full: dict[str, torch.Tensor]) -> str:
    res = subprocess.run(
        entrain(
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            str(RESUMED_STEPS),
            "--resume",
            str(out / "checkpoints"),
            "--save-params",
        ),  # fmt: skip
        capture_output=True,
        text=True,
        timeout=400,
        env=env(),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = params(out)
    for name, p in full.items():
        assert torch.equal(got[name], p), name
    return res.stdout


@pytest.mark.parametrize(
    "how, code",
    [("sigterm", 128 + signal.SIGTERM), ("sigint", 128 + signal.SIGINT),
     ("ctrl-c", 128 + signal.SIGINT), ("kill-torchrun", 128 + signal.SIGKILL)],
)  # fmt: skip
def test_a_stopped_run_leaves_nothing_running_and_says_so_once(data, tmp_path, how, code):
    rc, err, gone = start_and_stop(data, tmp_path / "run", how, "--checkpoint-on-stop")
    assert rc == code, err
    assert gone < 10, f"{how}: the run took {gone:.1f} s to end"
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "stopped by" in lines[0], err
    # --checkpoint-on-stop: the checkpoint is the step the run stopped after
    stopped_after = steps_logged(tmp_path / "run")
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{stopped_after:08d}", (latest, stopped_after)
    assert f"after step {stopped_after} " in lines[0] and latest in lines[0]


def test_a_killed_launcher_takes_its_ranks_with_it(data, tmp_path):
    rc, err, gone = start_and_stop(data, tmp_path / "run", "kill-launcher", "--checkpoint-every",
                                   "2")  # fmt: skip
    assert rc == -signal.SIGKILL
    assert gone < 10, f"the ranks took {gone:.1f} s to end"


@pytest.mark.parametrize("how", ["sigterm", "kill-torchrun"])
def test_the_checkpoint_a_stop_leaves_resumes_exactly_once(data, tmp_path, uninterrupted, how):
    out = tmp_path / "run"
    rc, err, _ = start_and_stop(data, out, how, "--checkpoint-every", "2")
    done = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 2 <= done < RESUMED_STEPS, err
    said = resume_matches(data, out, uninterrupted)
    assert f"{done} steps done" in said
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(RESUMED_STEPS))  # each step logged once

"""--device: which device each rank takes, and the refusals, on any machine (CUDA faked)."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import run_user_error

from entrain.runtime.device import backend, resolve_device, sync


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has n GPUs."""

    def make(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return make


def test_cpu_is_cpu_whatever_the_machine(gpus):
    gpus(8)
    assert resolve_device("cpu", 0, 2) == torch.device("cpu")


def test_auto_takes_a_gpu_per_process_when_there_are_enough(gpus):
    gpus(4)
    assert resolve_device("auto", 3, 4) == torch.device("cuda", 3)
    assert backend(resolve_device("auto", 0, 2)) == "cpu:gloo,cuda:nccl"


def test_auto_falls_back_to_the_cpu_for_every_rank_alike(gpus):
    gpus(1)  # a laptop GPU and a 3-process demo: all three ranks take the CPU
    assert {resolve_device("auto", r, 3) for r in range(3)} == {torch.device("cpu")}
    gpus(0)
    assert backend(resolve_device("auto", 0, 1)) == "gloo"


def test_cuda_without_enough_gpus_is_refused_with_the_counts(gpus):
    gpus(0)
    with pytest.raises(ValueError, match="sees no CUDA device"):
        resolve_device("cuda", 0, 1)
    gpus(2)
    with pytest.raises(ValueError, match="3 processes on this machine, 2 GPU"):
        resolve_device("cuda", 0, 3)
    with pytest.raises(ValueError, match="one of auto, cpu, cuda"):
        resolve_device("tpu", 0, 1)


def test_rank_and_world_come_from_torchrun(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_device("auto") == torch.device("cuda", 1)


def test_sync_on_the_cpu_is_free():
    sync(torch.device("cpu"))  # nothing queued, nothing to wait for


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["train", "profile"])
def test_cli_refuses_cuda_once_before_launching(capsys, tmp_path, command):
    from entrain.runtime.demo_data import make_demo_data

    manifest = make_demo_data(tmp_path, 4, seed=0)
    line = run_user_error(
        capsys, [command, "--data", str(manifest), "--device", "cuda", "--nproc", "2"]
    )
    assert "no CUDA device" in line

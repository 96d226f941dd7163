"""--device: which device each rank takes, and the refusals, on any machine (CUDA faked)."""

from __future__ import annotations

import pytest
import torch
from cli_helpers import run_user_error

from entrain.runtime.device import Placement, place, sync


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has n GPUs."""

    def make(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return make


CPU, GPU0, GPU1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


def test_cpu_is_cpu_whatever_the_machine(gpus):
    gpus(8)
    assert place("cpu", 0, 2) == Placement(CPU, CPU)
    assert place("cpu", 0, 2).backend == "gloo"


def test_auto_takes_a_gpu_per_process_when_there_are_enough(gpus):
    gpus(4)
    assert place("auto", 3, 4) == Placement(torch.device("cuda", 3), torch.device("cuda", 3))
    assert place("auto", 0, 2).backend == "cpu:gloo,cuda:nccl"


def test_auto_falls_back_to_the_cpu_for_every_rank_alike(gpus):
    gpus(1)  # a laptop GPU and a 3-process demo: all three ranks take the CPU
    assert {place("auto", r, 3) for r in range(3)} == {Placement(CPU, CPU)}
    gpus(0)
    assert place("auto", 0, 1).backend == "gloo"


def test_cuda_with_fewer_gpus_than_processes_shares_them_over_gloo(gpus):
    """NCCL refuses two ranks of a communicator on one GPU: messages go through host memory."""
    gpus(2)
    got = [place("cuda", r, 3) for r in range(3)]
    assert [p.device for p in got] == [GPU0, GPU1, GPU0]
    assert {p.wire for p in got} == {CPU} and {p.backend for p in got} == {"gloo"}


def test_cuda_without_any_gpu_or_a_bad_name_is_refused(gpus):
    gpus(0)
    with pytest.raises(ValueError, match="sees no CUDA device"):
        place("cuda", 0, 1)
    with pytest.raises(ValueError, match="one of auto, cpu, cuda"):
        place("tpu", 0, 1)


def test_rank_and_world_come_from_torchrun(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert place("auto").device == GPU1


def test_sync_on_the_cpu_is_free():
    sync()  # no CUDA touched here: nothing queued, nothing to wait for


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["train", "profile"])
def test_cli_refuses_cuda_once_before_launching(capsys, tmp_path, command):
    from entrain.runtime.demo_data import make_demo_data

    manifest = make_demo_data(tmp_path, 4, seed=0)
    line = run_user_error(
        capsys, [command, "--data", str(manifest), "--device", "cuda", "--nproc", "2"]
    )
    assert "no CUDA device" in line

"""Where a rank computes, and how its tensors travel.

- CPU ranks use gloo.
- Ranks with a GPU each put modules, inputs and messages on `cuda:LOCAL_RANK` and use NCCL
  for them, with gloo beside it for the small CPU tensors and Python objects of the control
  path (losses, metrics, the validation verdict): one process group with the backend
  "cpu:gloo,cuda:nccl" routes each tensor by its device.
- Ranks that share GPUs (`--device cuda` with more processes than GPUs, e.g. a 3-rank smoke
  run on one GPU) compute on `cuda:LOCAL_RANK % GPUs` but send through host memory over
  gloo: NCCL refuses two ranks of one communicator on the same GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from entrain.config import DEVICES
from entrain.cost.emulated import emulated_device, is_emulated


def check_device(name: str) -> None:
    """Refuse a --device that is none of DEVICES (before anything touches CUDA)."""
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")


@dataclass(frozen=True)
class Placement:
    """Where a rank computes and where its messages travel from."""

    device: torch.device
    wire: torch.device
    """The device messages and all-reduced gradients are sent from: the GPU itself under
    NCCL, host memory under gloo."""

    @property
    def backend(self) -> str:
        return "cpu:gloo,cuda:nccl" if self.wire.type == "cuda" else "gloo"


def place(name: str, local_rank: int | None = None, local_world: int | None = None) -> Placement:
    """Where a rank goes. "auto" takes a GPU per process when the node has one for every
    local process (all ranks of a node then agree) and the CPU otherwise, so a laptop demo
    with more processes than GPUs still runs on the CPU; "cuda" insists on GPUs: one each
    with NCCL when there are enough, shared (messages over gloo) when not, and fails clearly
    without any. Rank and world default to torchrun's environment."""
    cpu = torch.device("cpu")
    if is_emulated(name):  # no model: ranks sleep on the CPU (runtime/emulate.py)
        emulated_device(name)  # an unknown name or a bad profile: one error, before any rank
        return Placement(cpu, cpu)
    check_device(name)
    if name == "cpu":
        return Placement(cpu, cpu)
    env = os.environ
    local_rank = int(env.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    local_world = int(env.get("LOCAL_WORLD_SIZE", "1")) if local_world is None else local_world
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count >= local_world:
        gpu = torch.device("cuda", local_rank)
        return Placement(gpu, gpu)
    if name == "auto":
        return Placement(cpu, cpu)
    if count == 0:
        raise ValueError("--device cuda, but this torch build sees no CUDA device")
    return Placement(torch.device("cuda", local_rank % count), cpu)


def sync() -> None:
    """Wait for the work queued on this process's compute stream when it computes on a GPU,
    so that a wall-clock reading after it times the work, not its launch. Only the compute
    stream: a device-wide synchronize would also wait on sends parked in NCCL until their
    peer posts its receive, which may be waiting on this rank. A no-op in a process that
    has not touched CUDA (CPU ranks)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()


def name_of(placement: Placement) -> str:
    """What a profile records as its device: "cpu", or how messages travel and the GPU's
    name ("cuda-nccl: NVIDIA H200"; "cuda-gloo: ..." when ranks share a GPU)."""
    if placement.device.type != "cuda":
        return "cpu"
    wire = "nccl" if placement.wire.type == "cuda" else "gloo"
    return f"cuda-{wire}: {torch.cuda.get_device_name(placement.device)}"

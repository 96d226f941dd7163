"""Where a rank computes, and the process group that can move its tensors.

CPU ranks use gloo. CUDA ranks put modules, inputs and messages on `cuda:LOCAL_RANK` and
use NCCL for them, with gloo beside it for the small CPU tensors and Python objects of the
control path (losses, metrics, the validation verdict): one process group with the backend
"cpu:gloo,cuda:nccl" routes each tensor by its device.
"""

from __future__ import annotations

import os

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(
    name: str, local_rank: int | None = None, local_world: int | None = None
) -> torch.device:
    """The device a rank computes on: one GPU per process, `cuda:LOCAL_RANK` as torchrun
    numbers them. "auto" takes the GPUs when the node has one for every local process (all
    ranks of a node then agree) and the CPU otherwise, so a laptop demo with more processes
    than GPUs still runs; "cuda" asks for the GPUs and fails clearly when they are not
    there. Rank and world default to torchrun's environment."""
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    env = os.environ
    local_rank = int(env.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    local_world = int(env.get("LOCAL_WORLD_SIZE", "1")) if local_world is None else local_world
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count >= local_world:
        return torch.device("cuda", local_rank)
    if name == "auto":
        return torch.device("cpu")
    if count == 0:
        raise ValueError("--device cuda, but this torch build sees no CUDA device")
    raise ValueError(
        f"--device cuda needs a GPU per process: {local_world} processes on this machine, "
        f"{count} GPU(s); run fewer processes or pass --device cpu"
    )


def backend(device: torch.device) -> str:
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def sync(device: torch.device) -> None:
    """Wait for the work queued on this rank's compute stream, so that a wall-clock reading
    after it times the work, not its launch. Only the compute stream: a device-wide
    synchronize would also wait on sends parked in NCCL until their peer posts its receive,
    which may be waiting on this rank."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def sync_in_use() -> None:
    """`sync` of the current GPU when this process has put work on one (timing helpers that
    do not know where their work runs; a no-op in a CPU-only process)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()


def name_of(device: torch.device) -> str:
    """What a profile records as its device."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

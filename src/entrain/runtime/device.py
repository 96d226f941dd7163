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


def resolve_device(name: str) -> torch.device:
    """The device a rank computes on: "auto" is this rank's GPU when CUDA has one, else the
    CPU. The GPU is picked by LOCAL_RANK, one per process, as torchrun numbers them."""
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda, but this torch build sees no CUDA device")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if local >= count:
        raise ValueError(
            f"local rank {local} has no GPU of its own: this machine has {count}; "
            f"run at most {count} processes per node, or pass --device cpu"
        )
    return torch.device("cuda", local)


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

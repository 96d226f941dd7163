"""The training loop's numerics, shared by every rank and the single-process reference:
precision, the optimizer and its parameter groups, the learning-rate schedule, and
gradient clipping over the whole model.

- Precision: parameters, gradients and AdamW state stay in fp32 ("fp32 master weights");
  with bf16 the forward runs under `torch.autocast(bfloat16)` (matrix products in bf16, norms,
  softmax and the loss in fp32, as autocast chooses), and embeddings and activations travel
  between ranks in bf16. fp32 keeps the exact equivalence with the reference.
- AdamW (betas 0.9, 0.95) with weight decay on matrices only: norms' scales and biases
  (1-D tensors) are not decayed, as Megatron-LM and torchtitan do. foreach on the CPU, fused
  on a GPU.
- Schedule: linear warm-up, then constant, cosine or linear decay to `min_lr_ratio` of the
  peak at `decay_steps` (default: the run's last step).
- Clipping: the global L2 norm over every trained parameter of the model, each counted
  once however many ranks hold it (replicas, tied copies), summed over the whole world.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("constant", "cosine", "linear")
BETAS = (0.9, 0.95)


def resolve_precision(precision: str, device: torch.device) -> str:
    """ "auto" is bf16 on a GPU and fp32 on the CPU (where bf16 matrix products are slow)."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"--precision bf16: {name} has no bf16 support; use --precision fp32")
    return precision


def compute_context(
    precision: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the context a forward runs in: autocast to bf16, or nothing."""
    if precision != "bf16":
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def wire_dtype(precision: str) -> torch.dtype:
    """The dtype of embeddings, activations and their gradients between ranks."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def param_groups(named: dict[str, nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decayed, 1-D tensors (norm scales, biases) not."""
    trained = [(n, p) for n, p in named.items() if p.requires_grad]
    decay = [p for _, p in trained if p.ndim >= 2]
    rest = [p for _, p in trained if p.ndim < 2]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return groups


def optimizer(
    named: dict[str, nn.Parameter] | Iterable[nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    device: torch.device | None = None,
    shard_group=None,
) -> torch.optim.Optimizer | None:
    """AdamW over the trained parameters (None when there are none). With `shard_group`
    (the module's data-parallel group), ZeRO-1: each rank of the group keeps the AdamW state
    of its share of the parameters (torch's ZeroRedundancyOptimizer, which assigns whole
    tensors, largest first, to the least loaded rank), steps them, and broadcasts them."""
    if not isinstance(named, dict):
        named = {str(i): p for i, p in enumerate(named)}
    groups = param_groups(named, weight_decay)
    if not groups:
        return None
    fused = device is not None and device.type == "cuda"
    kwargs = dict(lr=lr, betas=BETAS, foreach=not fused, fused=fused or None)
    if shard_group is None:
        return torch.optim.AdamW(groups, **kwargs)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(
        groups, optimizer_class=torch.optim.AdamW, process_group=shard_group, **kwargs
    )


def local_optimizer(opt: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
    """The optimizer holding this rank's state: ZeRO's local shard, or `opt` itself."""
    return getattr(opt, "optim", opt)


def state_bytes(opt: torch.optim.Optimizer | None) -> int:
    """Bytes of optimizer state this rank holds."""
    local = local_optimizer(opt)
    if local is None:
        return 0
    return sum(
        v.numel() * v.element_size()
        for st in local.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor)
    )


def set_lr(opt: torch.optim.Optimizer | None, lr: float) -> None:
    if opt is not None:
        for group in opt.param_groups:
            group["lr"] = lr


def clip_coefficient(norm: float, max_norm: float | None) -> float:
    """What every gradient is multiplied by (torch.nn.utils.clip_grad_norm_'s rule)."""
    if max_norm is None:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))


def scale_grads(params: Iterable[nn.Parameter], coef: float) -> None:
    if coef == 1.0:
        return
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coef)


def local_sq_norm(params: Iterable[nn.Parameter]) -> torch.Tensor:
    """Sum of squares of these gradients, in fp64 (exact enough to sum across ranks)."""
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None:
            total += p.grad.detach().double().pow(2).sum().cpu()
    return total


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense bf16 FLOP/s of the rank's device, from the hardware table by the GPU's name
    (None where it is unknown, or on the CPU: MFU is then not reported)."""
    if device.type != "cuda" or precision != "bf16":
        return None
    from entrain.cost.hardware import HARDWARE

    name = torch.cuda.get_device_name(device).lower()
    for key, hw in HARDWARE.items():
        if key in name:
            return hw.peak_flops
    return None

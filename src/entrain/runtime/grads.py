"""Summing gradients over a module's replicas: in buckets, started while the last backward
of the step still runs.

Gradients accumulate over every microbatch of the step; only the rank's last backward makes
them final. Before it, the engine arms the reducer: from then on, as each parameter's
gradient is accumulated for the last time (a post-accumulate-grad hook), its bucket fills,
and a full bucket is flattened and all-reduced asynchronously, so the sums of the last
layers travel while the first layers are still differentiated (DDP's bucketing). Buckets
start strictly in their fixed order, the same on every rank of the group, whatever order the
hooks fire in: collectives must be issued in one order across ranks (NCCL's rule). `finish`
starts what is left (parameters the last backward did not reach), waits, and copies the
sums back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

BUCKET_BYTES = 25 * 2**20
"""DDP's default bucket size: large enough that a bucket's latency is paid once per 25 MB."""


class GradReducer:
    """All-reduce (sum) of `params`' gradients over `group`, in buckets of about
    `bucket_bytes`, in reverse parameter order (about the order backward finishes them)."""

    def __init__(
        self,
        params: list[nn.Parameter],
        group,
        wire: torch.device,
        bucket_bytes: int = BUCKET_BYTES,
    ):
        self.group, self.wire = group, wire
        self.buckets: list[list[nn.Parameter]] = [[]]
        size = 0
        for p in reversed([p for p in params if p.requires_grad]):
            if self.buckets[-1] and size + p.numel() * p.element_size() > bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.buckets = [b for b in self.buckets if b]
        self._bucket_of = {id(p): k for k, b in enumerate(self.buckets) for p in b}
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._ready) for b in self.buckets for p in b
        ]
        self.armed = False
        self._ready_count: list[int] = []
        self._started: list[tuple[torch.Tensor, object] | None] = []

    def arm(self) -> None:
        """The next backward is the step's last: reduce each bucket once it is complete."""
        self.armed = True
        self._ready_count = [0] * len(self.buckets)
        self._started = [None] * len(self.buckets)

    def _ready(self, p: nn.Parameter) -> None:
        if not self.armed:
            return
        k = self._bucket_of[id(p)]
        self._ready_count[k] += 1
        self._start_in_order()

    def _start_in_order(self, force: bool = False) -> None:
        for k, bucket in enumerate(self.buckets):
            if self._started[k] is not None:
                continue
            if not force and self._ready_count[k] < len(bucket):
                return  # a bucket waits for the ones before it: one order on every rank
            flat = torch.cat([_grad(p).reshape(-1) for p in bucket]).to(self.wire)
            self._started[k] = (flat, dist.all_reduce(flat, group=self.group, async_op=True))

    def finish(self) -> None:
        """Start the buckets the last backward did not complete, wait for all, and leave the
        sums in the gradients. Without an armed backward (a rank with no backward this
        step), every bucket goes now, zeros where nothing was accumulated."""
        if not self.armed:
            self.arm()
        self._start_in_order(force=True)
        for bucket, (flat, work) in zip(self.buckets, self._started):
            work.wait()
            offset = 0
            for p in bucket:
                n = p.numel()
                summed = flat[offset : offset + n].view_as(p).to(p.device)
                if p.grad is None:
                    p.grad = summed.clone()
                else:
                    p.grad.copy_(summed)
                offset += n
        self.armed = False

    def close(self) -> None:
        for h in self._hooks:
            h.remove()


def _grad(p: nn.Parameter) -> torch.Tensor:
    return p.grad if p.grad is not None else torch.zeros_like(p)

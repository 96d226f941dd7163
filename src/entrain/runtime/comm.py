"""Point-to-point transfer of variable-shape tensors: a fixed-size header, then the shapes,
then the payloads. Never pickled; peers are addressed by global rank.

Every transfer has a tag built from what it carries (kind, encoder, microbatches), so a
receiver can take messages in the order it needs them, whatever order they were sent in.
Sends are non-blocking (isend); the caller keeps the handles and waits at the end of the
iteration. A receive that waits longer than the timeout raises an error naming what it
waited for and from which rank.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

EMBED, EMBED_GRAD, ACT, ACT_GRAD = 0, 1, 2, 3


class TransferTimeout(RuntimeError):
    """A rank waited longer than the timeout for a message."""


def make_tag(kind: int, encoder: int, enc_mb: int, llm_mb: int) -> int:
    """A tag unique per transfer within an iteration (3 messages per transfer)."""
    assert enc_mb < 4096 and llm_mb < 4096 and encoder < 8
    return (((kind * 8 + encoder) * 4096 + enc_mb) * 4096 + llm_mb) * 4


@dataclass
class Mailbox:
    """Sends in flight, so their buffers live until the iteration ends."""

    timeout: datetime.timedelta
    pending: list = field(default_factory=list)

    def send(self, tensors: list[torch.Tensor], meta: list[int], dst: int, tag: int) -> None:
        """Send float32 tensors of any shapes plus integers (sample or unit ids) as three
        messages: the header's length, the header (meta, then each tensor's shape), and one
        flat payload."""
        header = [len(meta), *meta, len(tensors)]
        for t in tensors:
            header += [t.dim(), *t.shape]
        head = torch.tensor(header, dtype=torch.int64)
        size = torch.tensor([head.numel()], dtype=torch.int64)
        payload = torch.cat([t.detach().reshape(-1).float() for t in tensors]) if tensors else None
        msgs = [size, head] + ([payload] if payload is not None and payload.numel() else [])
        self.pending += [(m, dist.isend(m, dst, tag=tag + i)) for i, m in enumerate(msgs)]

    def recv(self, src: int, tag: int, what: str) -> tuple[list[int], list[torch.Tensor]]:
        """The (meta, tensors) of one `send`."""
        size = torch.empty(1, dtype=torch.int64)
        self._wait(dist.irecv(size, src, tag=tag), src, what)
        head = torch.empty(int(size), dtype=torch.int64)
        self._wait(dist.irecv(head, src, tag=tag + 1), src, what)
        h = head.tolist()
        meta = h[1 : 1 + h[0]]
        i = 1 + h[0]
        shapes = []
        for _ in range(h[i]):
            ndim = h[i + 1]
            shapes.append(h[i + 2 : i + 2 + ndim])
            i += 1 + ndim
        sizes = [math.prod(s) for s in shapes]  # prod of () is 1: a scalar
        flat = torch.empty(sum(sizes), dtype=torch.float32)
        if flat.numel():
            self._wait(dist.irecv(flat, src, tag=tag + 2), src, what)
        parts = torch.split(flat, sizes)
        return meta, [p.reshape(s).clone() for p, s in zip(parts, shapes)]  # leaves of their own

    def _wait(self, work, src: int, what: str) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            raise TransferTimeout(
                f"rank {dist.get_rank()} waited more than {self.timeout.total_seconds():.0f} s for "
                f"{what} from rank {src}: {e}"
            ) from None

    def flush(self) -> None:
        """Wait for every send of the iteration (their receivers have posted by now)."""
        for _, work in self.pending:
            work.wait(self.timeout)
        self.pending.clear()

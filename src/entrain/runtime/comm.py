"""Point-to-point transfer of variable-shape tensors, one message per transfer, receives
posted ahead. Never pickled; peers are addressed by global rank.

A message is bytes: the header's length, the header (meta, then each tensor's shape, as
int64), then one flat float32 payload. The receiver posts its receive early, as soon as it
knows the transfer will come (every rank derives every transfer of an iteration from the
plan), into a buffer of the transfer's capacity: an upper bound on its size that both sides
compute from the plan. Why: a gloo receive is a rendezvous (the sender holds the data until
the receiver says it is ready), and a header-then-payload protocol pays that round trip
per message, each time waiting for the sender's communication thread to get its busy core
back. With one message and the receive already posted, data moves while both sides compute.

Every transfer has a tag built from what it carries (kind, encoder, microbatches), so a
receiver can take messages in the order it needs them, whatever order they were sent in.
Sends are non-blocking (isend); the caller keeps the handles and waits at the end of the
iteration. A receive that waits longer than the timeout raises an error naming what it
waited for and from which rank.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

EMBED, EMBED_GRAD, ACT, ACT_GRAD = 0, 1, 2, 3
SLACK_ROWS = 4
"""Rows of headroom per tensor in a capacity (sizes the plan derives from a manifest may be
off by a rounding from what the files give)."""


class CommError(RuntimeError):
    """A transfer that cannot complete; the message names what was awaited and from whom."""


class TransferTimeout(CommError):
    """A rank waited longer than the timeout for a message."""


class PeerLost(CommError):
    """The peer a rank waited on went away (its process died or closed the connection)."""


class TransferTooLarge(RuntimeError):
    """A message outgrew the capacity both sides derived from the plan: the data is not what
    the manifest describes."""


def make_tag(kind: int, encoder: int, enc_mb: int, llm_mb: int) -> int:
    """A tag unique per transfer within an iteration."""
    assert enc_mb < 4096 and llm_mb < 4096 and encoder < 8
    return ((kind * 8 + encoder) * 4096 + enc_mb) * 4096 + llm_mb


def capacity(meta: int, rows: Sequence[int], width: int) -> int:
    """Bytes of a message carrying `meta` integers and one (rows[i] <= r, width) tensor per
    entry of `rows`, with SLACK_ROWS rows of headroom each."""
    header = 1 + 1 + meta + 1 + 3 * len(rows)
    values = sum(r + SLACK_ROWS for r in rows) * width
    return 8 * header + 4 * values


def _pack(tensors: list[torch.Tensor], meta: list[int]) -> torch.Tensor:
    header = [len(meta), *meta, len(tensors)]
    for t in tensors:
        header += [t.dim(), *t.shape]
    head = torch.tensor([len(header), *header], dtype=torch.int64).view(torch.uint8)
    if not tensors:
        return head
    payload = torch.cat([t.detach().reshape(-1).float() for t in tensors]).view(torch.uint8)
    return torch.cat([head, payload])


def _unpack(buf: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    n = int(buf[:8].view(torch.int64))
    h = buf[8 : 8 * (n + 1)].view(torch.int64).tolist()
    meta = h[1 : 1 + h[0]]
    i = 1 + h[0]
    shapes = []
    for _ in range(h[i]):
        ndim = h[i + 1]
        shapes.append(h[i + 2 : i + 2 + ndim])
        i += 1 + ndim
    sizes = [math.prod(s) for s in shapes]  # prod of () is 1: a scalar
    start = 8 * (n + 1)
    flat = buf[start : start + 4 * sum(sizes)].view(torch.float32)
    parts = torch.split(flat, sizes)
    return meta, [p.reshape(s).clone() for p, s in zip(parts, shapes)]  # leaves of their own


@dataclass
class Mailbox:
    """Receives posted ahead, and sends in flight (their buffers live until the iteration
    ends)."""

    timeout: datetime.timedelta
    pending: list = field(default_factory=list)
    posted: dict = field(default_factory=dict)

    def send(
        self, tensors: list[torch.Tensor], meta: list[int], dst: int, tag: int, cap: int, what: str
    ) -> None:
        """Send float32 tensors of any shapes plus integers (sample or unit ids) as one
        message of at most `cap` bytes."""
        msg = _pack(tensors, meta)
        if msg.numel() > cap:
            rank = dist.get_rank() if dist.is_initialized() else 0
            raise TransferTooLarge(
                f"rank {rank}: {what} is {msg.numel()} bytes, more than the "
                f"{cap} the plan allows; do the files match the sizes in the manifest?"
            )
        self.pending.append((msg, dist.isend(msg, dst, tag=tag)))

    def expect(self, src: int, tag: int, cap: int) -> None:
        """Post the receive of a transfer that will come, so it can land whenever it is sent."""
        if (src, tag) not in self.posted:
            buf = torch.empty(cap, dtype=torch.uint8)
            self.posted[(src, tag)] = (buf, dist.irecv(buf, src, tag=tag))

    def recv(self, src: int, tag: int, cap: int, what: str) -> tuple[list[int], list[torch.Tensor]]:
        """The (meta, tensors) of one `send` (posting its receive now if it was not)."""
        self.expect(src, tag, cap)
        buf, work = self.posted.pop((src, tag))
        self._wait(work, src, what)
        return _unpack(buf)

    def _wait(self, work, src: int, what: str) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                raise TransferTimeout(
                    f"rank {dist.get_rank()} waited more than "
                    f"{self.timeout.total_seconds():.0f} s for {what} from rank {src}: {e}"
                ) from None
            raise PeerLost(
                f"rank {dist.get_rank()} lost rank {src} while waiting for {what} "
                f"(did that process die? see its log): {e}"
            ) from None

    def flush(self) -> None:
        """Wait for every send of the iteration (their receivers have posted by now)."""
        for msg, work in self.pending:
            self._wait(work, -1, f"a send of {msg.numel()} bytes to complete")
        self.pending.clear()
        if self.posted:
            raise RuntimeError(f"receives posted but never taken: {sorted(self.posted)[:4]}")

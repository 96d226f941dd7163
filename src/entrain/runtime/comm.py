"""Point-to-point transfer of variable-shape tensors in an order both sides derive from the
plan: the order NCCL needs, kept on gloo too so the CPU tests run the protocol the GPUs run.

Every rank derives every transfer of an iteration from the plan (program/transfers.py): who
sends it to whom, which sample or unit ids it carries, its size in bytes, and, per directed
pair of ranks, the order the sender sends them in. That order is the contract:

- A sender sends each pair's transfers in exactly that order (a send out of order is a bug
  in the runtime and raises at once, naming both transfers).
- A receiver posts its receives on a pair in the same order and keeps what arrives until
  asked for. NCCL matches sends to receives per pair in issue order,
  ignoring tags; gloo is given tag 0 everywhere, so it matches the same way and an ordering
  bug shows on CPU as a wrong id list or a size mismatch, not only on a GPU.
- Every message has exactly its transfer's size (padded up to it): NCCL needs the send and
  the receive to agree on the count.
- A rank issues all its sends and receives in one order, the restriction to it of one
  global order of the step (program/order.py), on one process group. NCCL runs a
  communicator's operations one after the other in issue order, so only the head of a
  rank's queue can progress; in that order the earliest unfinished transfer of the step is
  at the head of both its ranks' queues, so the step always finishes. (Posting a receive
  early, ahead of a send the peer waits for, is what deadlocks there; the old design kept
  a process group per direction of each pair to get around it, which made communicators
  grow with the replicas squared and still relied on NCCL progressing them side by side.)

A message is bytes: the header's length, the header (ids, then each tensor's shape, as
int64), one flat payload (float32, or bfloat16 under bf16 training), zero padding.
Receives are posted as early as the order allows, into buffers on the compute device, so
data moves while both sides compute. A receive that waits longer than the timeout raises
an error naming what it waited for and from which rank.
"""

from __future__ import annotations

import datetime
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from entrain.program.messages import SLACK_ROWS, Transfer, capacity  # noqa: F401 (re-exported)


class CommError(RuntimeError):
    """A transfer that cannot complete; the message names what was awaited and from whom."""


class TransferTimeout(CommError):
    """A rank waited longer than the timeout for a message."""


class PeerLost(CommError):
    """The peer a rank waited on went away (its process died or closed the connection)."""


class TransferTooLarge(RuntimeError):
    """A message outgrew the capacity both sides derived from the plan: the data is not what
    the manifest describes."""


class OutOfOrder(RuntimeError):
    """The runtime sent or received against the order both sides derived from the plan: a
    bug in the runtime, not in the data (on NCCL it would have delivered the wrong data)."""


def _pack(
    tensors: list[torch.Tensor],
    meta: Sequence[int],
    size: int,
    device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    header = [len(meta), *meta, len(tensors)]
    for t in tensors:
        header += [t.dim(), *t.shape]
    head = torch.tensor([len(header), *header], dtype=torch.int64).view(torch.uint8).to(device)
    parts = [head]
    if tensors:
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors])
        parts.append(flat.view(torch.uint8))
    used = sum(p.numel() for p in parts)
    if used < size:
        parts.append(torch.zeros(size - used, dtype=torch.uint8, device=device))
    return torch.cat(parts)  # longer than size when too large: the caller raises


def _unpack(
    buf: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[list[int], list[torch.Tensor]]:
    n = int(buf[:8].cpu().view(torch.int64))
    h = buf[8 : 8 * (n + 1)].cpu().view(torch.int64).tolist()
    meta = h[1 : 1 + h[0]]
    i = 1 + h[0]
    shapes = []
    for _ in range(h[i]):
        ndim = h[i + 1]
        shapes.append(h[i + 2 : i + 2 + ndim])
        i += 1 + ndim
    sizes = [math.prod(s) for s in shapes]  # prod of () is 1: a scalar
    start = 8 * (n + 1)
    flat = buf[start : start + dtype.itemsize * sum(sizes)].view(dtype)
    parts = torch.split(flat, sizes)
    return meta, [p.reshape(s).clone() for p, s in zip(parts, shapes)]  # leaves of their own


def p2p_channels(
    pairs: Iterable[tuple[int, int]], wire: torch.device
) -> dict[tuple[int, int], object]:
    """The channels of the step's transfers: one process group of every rank for all of
    them, mapped from each (src, dst) pair that may carry one (program/transfers.py's
    `edges`; the Mailbox refuses any other pair). One group, so one communicator per rank on
    NCCL however many replicas share encoders: the program's global order is what keeps the
    single queue from deadlocking, not separate channels. Every rank must call this at the
    same point (torch.distributed's rule for new_group); the all-reduce makes NCCL create
    the communicator on every rank at once, not at the first transfer."""
    group = dist.new_group(list(range(dist.get_world_size())))
    token = torch.zeros(1, device=wire)
    dist.all_reduce(token, group=group)
    return dict.fromkeys(sorted(set(pairs)), group)


@dataclass
class Mailbox:
    """One rank's sends and receives of a step, issued in the step program's order.

    `begin` takes the rank's communication in the order of one global sequence all ranks
    derive (program/order.py); every send and receive is issued to torch.distributed in that
    order and no other: receives as early as the order allows (all those before the next
    send, as soon as that send is issued), sends when the rank has the data and they are
    next. So even where all of a rank's operations go through one queue and only its head
    can progress (NCCL on one communicator), the step cannot deadlock."""

    timeout: datetime.timedelta
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where the rank computes: received tensors land there."""
    groups: dict = field(default_factory=dict)
    """(src, dst) -> the process group that carries it (missing: the default group); with
    groups given, a transfer on a pair without one is refused (outside the replica pool)."""
    pending: list = field(default_factory=list)
    posted: dict = field(default_factory=dict)
    _queue: deque = field(default_factory=deque)
    _in_by_key: dict = field(default_factory=dict)
    _out_by_key: dict = field(default_factory=dict)
    wire: torch.device | None = None
    """Where messages travel from (None: `device`); the CPU when ranks share a GPU."""
    dtype: torch.dtype = torch.float32
    """The values' dtype on the wire (bf16 under bf16 training)."""
    sent: list = field(default_factory=list)
    """(key, receiver, bytes) of every message sent since `begin`, in order."""

    def __post_init__(self) -> None:
        self.wire = self.device if self.wire is None else self.wire

    def begin(self, ops: Iterable) -> None:
        """Take the step's communication of this rank in its order: the program's Send and
        Recv operations, or plain Transfers (sent when this rank is their sender, received
        when it is their receiver), in the order given."""
        rank = dist.get_rank()
        self._queue, self._in_by_key, self._out_by_key = deque(), {}, {}
        self.sent = []
        for op in ops:
            t = getattr(op, "transfer", op)
            if rank not in (t.src, t.dst):
                continue
            if self.groups and (t.src, t.dst) not in self.groups:
                raise OutOfOrder(
                    f"rank {rank}: no channel from rank {t.src} to rank {t.dst} for {t.what}: "
                    "the assignment sent work outside the replica pool the runtime planned for"
                )
            sending = t.src == rank
            (self._out_by_key if sending else self._in_by_key)[t.key] = t
            self._queue.append((sending, t))
        self._post_receives()

    def _post_receives(self) -> None:
        """Post every receive at the head of the order, up to the next send."""
        while self._queue and not self._queue[0][0]:
            _, t = self._queue.popleft()
            buf = torch.empty(t.size, dtype=torch.uint8, device=self.wire)
            work = dist.irecv(buf, t.src, group=self.groups.get((t.src, t.dst)))
            self.posted[t.key] = (buf, work, t)

    def send(self, key: tuple, tensors: list[torch.Tensor]) -> None:
        """Send tensors of any shapes as transfer `key` (in the wire's dtype); it must be the
        next send of this rank's order."""
        t = self._out_by_key.get(key)
        if t is None:
            raise OutOfOrder(f"rank {dist.get_rank()} sends {key}, which the plan does not have")
        if not self._queue or self._queue[0][1] is not t:
            due = (
                f"sends {self._queue[0][1].key} first"
                if any(x is t for _, x in self._queue)
                else "has sent it already"
            )
            raise OutOfOrder(
                f"rank {dist.get_rank()} sends {key} to rank {t.dst}, but the plan's order {due}"
            )
        self._queue.popleft()
        msg = _pack(tensors, t.ids, t.size, self.device, self.dtype).to(self.wire)
        if msg.numel() > t.size:
            raise TransferTooLarge(
                f"rank {dist.get_rank()}: {t.what} is {msg.numel()} bytes, more than the "
                f"{t.size} the plan allows; do the files match the sizes in the manifest?"
            )
        group = self.groups.get((t.src, t.dst))
        self.pending.append((msg, t, dist.isend(msg, t.dst, group=group)))
        self.sent.append((t.key, t.dst, msg.numel()))
        self._post_receives()

    def expect(self, key: tuple) -> None:
        """Check that transfer `key` is one this rank receives; the order posts it (as early
        as it allows), so there is nothing to do early by hand."""
        if key not in self._in_by_key:
            raise OutOfOrder(f"rank {dist.get_rank()} expects {key}, which the plan does not have")

    def recv(self, key: tuple) -> tuple[list[int], list[torch.Tensor]]:
        """The (ids, tensors) of transfer `key`."""
        self.expect(key)
        if key not in self.posted:
            t = self._in_by_key[key]
            if any(x is t for _, x in self._queue):  # behind a send this rank has not made
                raise OutOfOrder(
                    f"rank {dist.get_rank()} waits for {t.what} from rank {t.src}, but the "
                    f"plan's order sends {self._queue[0][1].key} first"
                )
            raise OutOfOrder(f"rank {dist.get_rank()} takes {key} a second time")
        buf, work, t = self.posted.pop(key)
        self._wait(work, t.src, f"{t.what} from rank {t.src}")
        meta, tensors = _unpack(buf, self.dtype)
        if tuple(meta) != t.ids:
            raise OutOfOrder(
                f"rank {dist.get_rank()} took {t.what} from rank {t.src} but got ids "
                f"{meta[:8]}, not {list(t.ids[:8])}: the two sides' orders differ"
            )
        return meta, [x.to(self.device) for x in tensors]

    def _wait(self, work, peer: int, what: str) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            if "timed out" in str(e).lower() or "timeout" in str(e).lower():
                raise TransferTimeout(
                    f"rank {dist.get_rank()} waited more than "
                    f"{self.timeout.total_seconds():.0f} s for {what}: {e}"
                ) from None
            raise PeerLost(
                f"rank {dist.get_rank()} lost rank {peer} while waiting for {what} "
                f"(did that process die? see its log): {e}"
            ) from None

    def flush(self) -> None:
        """Wait for every send of the iteration; check every transfer was made and taken."""
        for _msg, t, work in self.pending:
            self._wait(work, t.dst, f"the send of {t.what} to rank {t.dst} to complete")
        self.pending.clear()
        left = [t.key for _, t in self._queue] + list(self.posted)
        if left:
            raise OutOfOrder(
                f"rank {dist.get_rank()}: transfers of the plan never sent or taken: {left[:4]}"
            )

"""Point-to-point transfer of variable-shape tensors in an order both sides derive from the
plan: the order NCCL needs, kept on gloo too so the CPU tests run the protocol the GPUs run.

Every rank derives every transfer of an iteration from the plan (runtime/transfers.py): who
sends it to whom, which sample or unit ids it carries, its size in bytes, and, per directed
pair of ranks, the order the sender sends them in. That order is the contract:

- A sender sends each pair's transfers in exactly that order (a send out of order is a bug
  in the runtime and raises at once, naming both transfers).
- A receiver posts its receives on a pair in the same order. Taking transfer n posts every
  earlier one of that pair first (their data is on the way: the sender sent them before n)
  and keeps them until asked for. NCCL matches sends to receives per pair in issue order,
  ignoring tags; gloo is given tag 0 everywhere, so it matches the same way and an ordering
  bug shows on CPU as a wrong id list or a size mismatch, not only on a GPU.
- Every message has exactly its transfer's size (padded up to it): NCCL needs the send and
  the receive to agree on the count.
- Each direction of a pair gets a process group of its own (`edge_groups`). NCCL runs a
  communicator's operations in issue order on one stream, so with one group per pair a
  receive posted ahead would hold up the sends in the other direction (an LLM stage waiting
  for microbatch 2's embeddings could not send microbatch 0's gradients the encoder needs to
  get there: a deadlock). With a group per direction a channel carries one way only.

A message is bytes: the header's length, the header (ids, then each tensor's shape, as
int64), one flat payload (float32, or bfloat16 under bf16 training), zero padding.
Receives are posted early (as soon as the caller knows it will need them), into buffers on
the compute device, so data moves while both sides compute. A receive that waits longer
than the timeout raises an error naming what it waited for and from which rank.
"""

from __future__ import annotations

import datetime
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from entrain.runtime.messages import SLACK_ROWS, Transfer, capacity  # noqa: F401 (re-exported)


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


def edge_groups(edges: Iterable[tuple[int, int]]) -> dict[tuple[int, int], object]:
    """A process group per directed pair (src, dst) that will carry transfers. Every rank
    must call this with the same edges in the same order (torch.distributed's rule for
    new_group); the order here is sorted, whatever the caller's."""
    return {e: dist.new_group(sorted(e)) for e in sorted(set(edges))}


def connect(groups: dict[tuple[int, int], object], wire: torch.device) -> None:
    """One small blocking message along every edge, edges in sorted order on every rank.
    NCCL creates a group's communicator on its first operation and blocks until the peer
    creates it too; left to the first real transfers, an encoder creating the gradient
    channel while the LLM creates the embedding channel would wait on each other forever.
    In one global order each rank's creations are a subsequence of the same sequence, so
    none waits in a cycle. On gloo it only moves the connection time out of the first step."""
    rank = dist.get_rank()
    token = torch.zeros(1, device=wire)
    for (src, dst), group in sorted(groups.items()):
        if rank == src:
            dist.send(token, dst, group=group)
        elif rank == dst:
            dist.recv(token, src, group=group)


@dataclass
class Mailbox:
    """One rank's sends and receives of an iteration, in the plan's per-pair order."""

    timeout: datetime.timedelta
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where the rank computes: received tensors land there."""
    groups: dict = field(default_factory=dict)
    """(src, dst) -> process group of that direction (missing: the default group)."""
    pending: list = field(default_factory=list)
    posted: dict = field(default_factory=dict)
    _out: dict = field(default_factory=dict)
    _in: dict = field(default_factory=dict)
    _in_by_key: dict = field(default_factory=dict)
    _out_by_key: dict = field(default_factory=dict)
    wire: torch.device | None = None
    """Where messages travel from (None: `device`); the CPU when ranks share a GPU."""
    dtype: torch.dtype = torch.float32
    """The values' dtype on the wire (bf16 under bf16 training)."""

    def __post_init__(self) -> None:
        self.wire = self.device if self.wire is None else self.wire

    def begin(self, transfers: Iterable[Transfer]) -> None:
        """Take the iteration's transfers that start or end here, each pair's in the order
        its sender sends them."""
        rank = dist.get_rank()
        self._out, self._in, self._in_by_key, self._out_by_key = {}, {}, {}, {}
        for t in transfers:
            if self.groups and (t.src, t.dst) not in self.groups and rank in (t.src, t.dst):
                raise OutOfOrder(
                    f"rank {rank}: no channel from rank {t.src} to rank {t.dst} for {t.what}: "
                    "the assignment sent work outside the replica pool the runtime planned for"
                )
            if t.src == rank:
                self._out.setdefault(t.dst, deque()).append(t)
                self._out_by_key[t.key] = t
            elif t.dst == rank:
                self._in.setdefault(t.src, deque()).append(t)
                self._in_by_key[t.key] = t

    def send(self, key: tuple, tensors: list[torch.Tensor]) -> None:
        """Send tensors of any shapes as transfer `key` (in the wire's dtype); the next of
        its pair."""
        t = self._out_by_key.get(key)
        if t is None:
            raise OutOfOrder(f"rank {dist.get_rank()} sends {key}, which the plan does not have")
        queue = self._out[t.dst]
        if not queue or queue[0] is not t:
            due = f"sends {queue[0].key} first" if t in queue else "has sent it already"
            raise OutOfOrder(
                f"rank {dist.get_rank()} sends {key} to rank {t.dst}, but the plan's order {due}"
            )
        queue.popleft()
        msg = _pack(tensors, t.ids, t.size, self.device, self.dtype).to(self.wire)
        if msg.numel() > t.size:
            raise TransferTooLarge(
                f"rank {dist.get_rank()}: {t.what} is {msg.numel()} bytes, more than the "
                f"{t.size} the plan allows; do the files match the sizes in the manifest?"
            )
        group = self.groups.get((t.src, t.dst))
        self.pending.append((msg, t, dist.isend(msg, t.dst, group=group)))

    def expect(self, key: tuple) -> None:
        """Post the receive of transfer `key` (and of every earlier one from its sender) so it
        can land whenever it is sent."""
        t = self._in_by_key.get(key)
        if t is None:
            raise OutOfOrder(f"rank {dist.get_rank()} expects {key}, which the plan does not have")
        if key in self.posted:
            return
        queue = self._in[t.src]
        while queue:
            nxt = queue.popleft()
            buf = torch.empty(nxt.size, dtype=torch.uint8, device=self.wire)
            work = dist.irecv(buf, nxt.src, group=self.groups.get((nxt.src, nxt.dst)))
            self.posted[nxt.key] = (buf, work, nxt)
            if nxt is t:
                return
        raise OutOfOrder(f"rank {dist.get_rank()} takes {key} a second time")

    def recv(self, key: tuple) -> tuple[list[int], list[torch.Tensor]]:
        """The (ids, tensors) of transfer `key`."""
        self.expect(key)
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
        left = [t.key for q in (*self._out.values(), *self._in.values()) for t in q]
        left += list(self.posted)
        if left:
            raise OutOfOrder(
                f"rank {dist.get_rank()}: transfers of the plan never sent or taken: {left[:4]}"
            )

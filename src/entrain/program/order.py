"""Every rank's operations of one step, in one order that is consistent across ranks.

A rank's operations are its computes (the pipeline action list of its role: forwards and
backwards of its microbatches) and its communication (a send after the compute that made
the data, a receive before the compute that needs it). NCCL runs a communicator's
point-to-point operations one after the other in the order they were issued, and a send
completes only when the peer has posted the matching receive; with every operation of a
rank on one queue (one communicator, or CUDA_DEVICE_MAX_CONNECTIONS=1), only the head of
each queue can make progress.

The order below makes that safe by construction. All operations of the step are put in one
global sequence that respects the dataflow (a compute after its inputs' transfers, a
transfer after the compute that made it, each rank's computes in its action-list order),
and each rank issues its operations in that sequence's order. Then nothing can wait in a
cycle: the earliest unfinished operation of the whole sequence is at the head of its
rank's queue (everything before it on that rank is earlier in the sequence, so finished),
and if it is a transfer, the same holds on the peer, so the two heads match. A design that
posts a receive early, ahead of a send the peer is waiting for, is exactly what this rules
out (tests/test_transfers.py runs both under a single-queue stand-in for NCCL).

The sequence is a list schedule: the step is played out with each compute taking
`duration(rank, compute)` (1 by default, or costs) and transfers taking no time, and
operations are listed as they happen; a send is listed as soon as its data exists, so a
rank's queue holds a send behind as little as possible.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

from entrain.program.iteration import IterationPlan
from entrain.program.messages import PASSES, Transfer
from entrain.program.transfers import Role, action_list


@dataclass(frozen=True)
class Compute:
    """A forward ("F") or backward ("B") of microbatch `mb` of the rank's module; in a step
    program, with the transfers it waits for and those it makes (what the engine receives
    before it and sends after it)."""

    kind: str
    mb: int
    needs: tuple[Transfer, ...] = field(default=(), compare=False, repr=False)
    makes: tuple[Transfer, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class Send:
    transfer: Transfer


@dataclass(frozen=True)
class Recv:
    transfer: Transfer


Op = Compute | Send | Recv


def actions_of(it: IterationPlan, role: Role, trains: dict[str, bool]) -> list[Compute]:
    """The rank's computes in the order it runs them (schedule/pipeline.py's lists)."""
    return [Compute(kind, mb) for kind, mb in action_list(it, role, trains)]


def step_program(
    it: IterationPlan,
    layout: list[Role],
    trains: dict[str, bool],
    duration: Callable[[int, Compute], float] | None = None,
) -> list[list[Op]]:
    """Every rank's operations of the step (index: rank), each rank's list a restriction of
    one global order that respects the dataflow (see the module docstring). Every rank that
    computes this from the same plan gets the same lists."""
    dur = duration or (lambda rank, op: 1.0)
    n = len(layout)
    table = it.messages
    if table.ranks.world != n:
        raise ValueError(f"the step's messages are for {table.ranks.world} ranks, not {n}")
    computes = [action_list(it, role, trains) for role in layout]
    index = [{c: i for i, c in enumerate(cs)} for cs in computes]
    made_by: dict[tuple[int, int], list[Transfer]] = {}  # (rank, compute) -> its transfers
    wanted: dict[tuple[int, int], list[Transfer]] = {}  # (rank, compute) -> what it needs
    for i, t in enumerate(table.transfers()):
        make = index[t.src][PASSES[table.make[i, 0]], int(table.make[i, 1])]
        need = index[t.dst][PASSES[table.need[i, 0]], int(table.need[i, 1])]
        made_by.setdefault((t.src, make), []).append(t)
        wanted.setdefault((t.dst, need), []).append(t)
    needs = [[len(wanted.get((r, i), ())) for i in range(len(cs))] for r, cs in enumerate(computes)]
    needed_by = {t.key: rank_op for rank_op, ts in wanted.items() for t in ts}

    program: list[list[Op]] = [[] for _ in range(n)]
    nxt = [0] * n  # each rank's next compute
    busy = [False] * n
    events: list[tuple[float, int, int]] = []  # (finish time, seq, rank)
    seq = 0

    def start(rank: int, now: float) -> None:
        nonlocal seq
        i = nxt[rank]
        if busy[rank] or i >= len(computes[rank]) or needs[rank][i]:
            return
        kind, mb = computes[rank][i]
        op = Compute(kind, mb, tuple(wanted.get((rank, i), ())), tuple(made_by.get((rank, i), ())))
        program[rank].append(op)
        busy[rank] = True
        heapq.heappush(events, (now + dur(rank, op), seq, rank))
        seq += 1

    for rank in range(n):
        start(rank, 0.0)
    while events:
        now, _, rank = heapq.heappop(events)
        i = nxt[rank]
        nxt[rank], busy[rank] = i + 1, False
        woken = [rank]
        for t in made_by.get((rank, i), []):  # listed as soon as the data exists
            program[t.src].append(Send(t))
            program[t.dst].append(Recv(t))
            dst, j = needed_by[t.key]
            needs[dst][j] -= 1
            woken.append(dst)
        for r in woken:  # the sender first: its next compute needs nothing from the others
            start(r, now)
    stuck = [layout[r] for r in range(n) if nxt[r] < len(computes[r])]
    if stuck:  # the action lists and the transfers disagree: a bug, not a data problem
        raise RuntimeError(f"the step program cannot finish: {stuck[:4]} wait on each other")
    return program


def comm_ops(ops: list[Op]) -> list[Send | Recv]:
    """A rank's communication, in its order (what it issues, and its Mailbox holds it to)."""
    return [op for op in ops if not isinstance(op, Compute)]

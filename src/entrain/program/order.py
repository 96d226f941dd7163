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
from dataclasses import dataclass

from entrain.program.iteration import IterationPlan
from entrain.program.messages import Transfer
from entrain.program.transfers import Role, sends
from entrain.schedule.pipeline import encoder_actions, one_f_one_b


@dataclass(frozen=True)
class Compute:
    """A forward ("F") or backward ("B") of microbatch `mb` of the rank's module."""

    kind: str
    mb: int


@dataclass(frozen=True)
class Send:
    transfer: Transfer


@dataclass(frozen=True)
class Recv:
    transfer: Transfer


Op = Compute | Send | Recv


def actions_of(it: IterationPlan, role: Role, trains: dict[str, bool]) -> list[Compute]:
    """The rank's computes in the order it runs them (schedule/pipeline.py's lists)."""
    P, M = it.llm_stages, it.asg.microbatches
    if role.module == "llm":
        acts = one_f_one_b(P, role.stage, M)
    else:
        acts = encoder_actions(it.need(role.module, role.replica), P, trains[role.module])
    return [Compute(kind, int(k)) for kind, k in acts]


def _endpoints(
    t: Transfer, first_use: dict[tuple, int]
) -> tuple[tuple[int, str, int], tuple[int, str, int]]:
    """(rank, kind, microbatch) of the compute that makes transfer `t` and of the one that
    needs it; `first_use[(d, (e, r, k, c))]` is the first LLM microbatch of replica d that
    uses encoder microbatch k of (e, r, c) (where the first stage takes its message)."""
    kind = t.key[0]
    if kind == "act":
        _, r, s, j = t.key
        return (t.src, "F", j), (t.dst, "F", j)
    if kind == "act_grad":
        _, r, s, j = t.key
        return (t.src, "B", j), (t.dst, "B", j)
    if kind == "embed":
        _, e, r, k, d, c = t.key
        return (t.src, "F", k), (t.dst, "F", first_use[d, (e, r, k, c)])
    if kind == "embed_grad":
        _, e, rs, k, d, j, c = t.key
        return (t.src, "B", j), (t.dst, "B", k)
    raise ValueError(f"unknown transfer kind {kind!r} in {t.key}")


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
    first_use: dict[tuple, int] = {}
    for d in range(it.asg.dp):
        for j in range(it.asg.microbatches):  # LLM forwards run in microbatch order
            for src in it.embed_sources(d, j):
                first_use.setdefault((d, src), j)
    computes = [actions_of(it, role, trains) for role in layout]
    index = [{(c.kind, c.mb): i for i, c in enumerate(cs)} for cs in computes]
    made_by: dict[tuple[int, int], list[Transfer]] = {}  # (rank, compute) -> its transfers
    needs = [[0] * len(cs) for cs in computes]  # transfers each compute still waits for
    needed_by: dict[str, tuple[int, int]] = {}
    for role in layout:
        for t in sends(it, role, layout, trains):
            (src, fk, fm), (dst, tk, tm) = _endpoints(t, first_use)
            made_by.setdefault((src, index[src][fk, fm]), []).append(t)
            consumer = (dst, index[dst][tk, tm])
            needs[consumer[0]][consumer[1]] += 1
            needed_by[t.key] = consumer

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
        op = computes[rank][i]
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

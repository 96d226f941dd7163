"""The step program (program/order.py): every rank's operations in one global order.

What makes the runtime's point-to-point deadlock-free on NCCL is a property of the lists,
checked here directly (the lists of all ranks merge into one acyclic order) and by running
them (the single-queue stand-in for NCCL of tests/test_transfers.py finishes every random
layout: policy, dp 1-4, pp 1-4, frozen or trained encoders, encoder copies, lookahead,
pooling).
"""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

import pytest
import torch
from test_transfers import SPEC, run_threads

import entrain.runtime.comm as comm
from entrain.cost.batch import cost_batch
from entrain.cost.hardware import HARDWARE
from entrain.program.iteration import IterationPlan
from entrain.program.order import Compute, Recv, Send, actions_of, comm_ops, step_program
from entrain.program.transfers import edges, roles, sends
from entrain.schedule import POLICIES, assign, replica_pool
from entrain.schedule.parallel import ParallelPlan
from entrain.sim.simulator import simulate
from entrain.workload.traces import generate_workload


@dataclasses.dataclass
class Case:
    policy: str
    dp: int
    pp: int
    M: int
    frozen: tuple[bool, bool]
    copies: dict[str, int]
    lookahead: int | None
    pool: int | None
    seed: int

    def spec(self):
        encoders = tuple(
            dataclasses.replace(e, frozen=f) for e, f in zip(SPEC.encoders, self.frozen)
        )
        return dataclasses.replace(SPEC, encoders=encoders)

    def build(self):
        spec = self.spec()
        w = generate_workload("omni", 6 * self.dp * self.M // 2 + self.dp, seed=self.seed)
        batch = cost_batch(w, spec)
        asg = assign(self.policy, batch, self.dp, self.M, self.lookahead, self.pool)
        it = IterationPlan.build(batch, asg, spec, self.pp, w, copies=self.copies)
        names = [e.name for e in spec.encoders]
        plan = ParallelPlan(
            dp=self.dp,
            llm_pp=self.pp,
            microbatches=self.M,
            encoder_tp=dict.fromkeys(names, 1),
            encoder_dp=self.copies,
        )
        trains = {e.name: not e.frozen for e in spec.encoders}
        return spec, it, roles(plan, names), trains


def random_cases(n: int, seed: int = 0) -> list[Case]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        dp = rng.randint(1, 4)
        out.append(
            Case(
                policy=rng.choice(sorted(POLICIES)),
                dp=dp,
                pp=rng.randint(1, 4),
                M=rng.choice([1, 2, 3, 4, 6]),
                frozen=(rng.random() < 0.3, rng.random() < 0.3),
                copies={"vision": 2} if rng.random() < 0.25 else {},
                lookahead=rng.choice([0, 1, 2, None]),
                pool=rng.choice([None, 1, 2]) if dp > 1 else None,
                seed=i,
            )
        )
    return out


CASES = random_cases(50)


def merged_order_is_acyclic(program: list[list]) -> bool:
    """Whether the ranks' lists merge into one order: the graph whose edges join each op to
    the next on its rank, a transfer's Send and Recv being one node, has no cycle."""
    node = {}
    succ: dict = {}
    for r, ops in enumerate(program):
        prev = None
        for i, op in enumerate(ops):
            key = ("t", op.transfer.key) if not isinstance(op, Compute) else ("c", r, i)
            node.setdefault(key, len(node))
            if prev is not None:
                succ.setdefault(prev, set()).add(node[key])
            prev = node[key]
    indeg = [0] * len(node)
    for bs in succ.values():
        for b in bs:
            indeg[b] += 1
    ready = [i for i in range(len(node)) if indeg[i] == 0]
    seen = 0
    while ready:
        a = ready.pop()
        seen += 1
        for b in succ.get(a, ()):
            indeg[b] -= 1
            if indeg[b] == 0:
                ready.append(b)
    return seen == len(node)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.policy}-dp{c.dp}pp{c.pp}M{c.M}")
def test_every_rank_runs_its_actions_and_its_transfers_in_one_global_order(case):
    spec, it, layout, trains = case.build()
    program = step_program(it, layout, trains)
    everything = {t.key: t for role in layout for t in sends(it, role, layout, trains)}
    for rank, ops in enumerate(program):
        assert [op for op in ops if isinstance(op, Compute)] == actions_of(it, layout[rank], trains)
        sent = [op.transfer.key for op in ops if isinstance(op, Send)]
        got = [op.transfer.key for op in ops if isinstance(op, Recv)]
        assert sorted(sent) == sorted(k for k, t in everything.items() if t.src == rank)
        assert sorted(got) == sorted(k for k, t in everything.items() if t.dst == rank)
        assert len(comm_ops(ops)) == len(sent) + len(got)
    assert merged_order_is_acyclic(program)


def test_the_check_catches_two_ranks_that_disagree():
    """The acyclicity check is not vacuous: swap two transfers on one rank whose peer keeps
    them in the other order, and the lists no longer merge."""
    spec, it, layout, trains = Case("llm-balanced", 1, 2, 4, (False, False), {}, 0, None, 1).build()
    program = step_program(it, layout, trains)
    llm0 = next(r for r, role in enumerate(layout) if role.module == "llm" and role.stage == 0)
    ops = program[llm0]
    s = [i for i, op in enumerate(ops) if isinstance(op, Send) and op.transfer.key[0] == "act"]
    r = [i for i, op in enumerate(ops) if isinstance(op, Recv) and op.transfer.key[0] == "act_grad"]
    i, j = s[0], r[0]  # stage 0 sends microbatch 0, later takes its gradient; stage 1 too
    assert i < j
    ops[i], ops[j] = ops[j], ops[i]
    assert not merged_order_is_acyclic(program)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.policy}-dp{c.dp}pp{c.pp}M{c.M}")
def test_the_single_queue_harness_finishes_every_random_layout(case):
    torch.set_num_threads(1)
    spec, it, layout, trains = case.build()
    block = replica_pool(case.policy, case.dp, case.pool)
    errors = run_threads(spec, it, case.dp, case.pp, block=block, copies=case.copies)
    assert not errors, {r: repr(e) for r, e in errors.items()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.policy}-dp{c.dp}pp{c.pp}M{c.M}")
def test_the_runtime_sends_exactly_the_messages_the_simulator_times(case):
    """What the workers hand their Mailbox and what the wire carries (the stand-in counts
    every byte) equal, one for one, the messages the simulator's graph times: sender,
    receiver, key, bytes, and each sender's order (its computes' order)."""
    torch.set_num_threads(1)
    spec, it, layout, trains = case.build()
    sent: dict = {}
    block = replica_pool(case.policy, case.dp, case.pool)
    errors = run_threads(spec, it, case.dp, case.pp, block=block, copies=case.copies, sent=sent)
    assert not errors, {r: repr(e) for r, e in errors.items()}
    names = [e.name for e in spec.encoders]
    plan = ParallelPlan(dp=case.dp, llm_pp=case.pp, microbatches=case.M,
                        encoder_tp=dict.fromkeys(names, 1), encoder_dp=case.copies)  # fmt: skip
    timed = simulate(it.batch, it.asg, spec, plan, HARDWARE["h100"], value_bytes=4).messages
    for rank, role in enumerate(layout):
        position = {(a.kind, a.mb): i for i, a in enumerate(actions_of(it, role, trains))}
        rows = [i for i in range(len(timed)) if timed.src[i] == rank]
        rows.sort(key=lambda i: position["FB"[timed.make[i, 0]], timed.make[i, 1]])
        expected = [(timed.key(i), int(timed.dst[i]), int(timed.nbytes[i])) for i in rows]
        assert sent[rank] == expected, layout[rank]
    wire: dict = {}
    for i in range(len(timed)):  # per pair, the order the sender's computes make them
        wire.setdefault((int(timed.src[i]), int(timed.dst[i])), []).append(i)
    assert {pair: sorted(timed.nbytes[r] for r in rows) for pair, rows in wire.items()} == {
        pair: sorted(sizes) for pair, sizes in sent["wire"].items()
    }
    for (src, dst), sizes in sent["wire"].items():
        assert sizes == [n for key, d, n in sent[src] if d == dst]


def test_costs_change_the_interleaving_not_the_validity():
    """With durations (a heavy first stage), the program is another linear extension."""
    spec, it, layout, trains = Case("entrain", 2, 3, 4, (False, True), {}, None, None, 3).build()
    plain = step_program(it, layout, trains)
    weighted = step_program(
        it, layout, trains, lambda rank, op: 5.0 if layout[rank].stage == 0 else 1.0
    )
    assert merged_order_is_acyclic(weighted)
    assert plain != weighted


def test_one_communicator_for_all_transfers_of_32_ranks(monkeypatch):
    """dp 4 x [vision, audio, 6 LLM stages] with units pooled over all replicas: the
    transfers may use 112 directed pairs, which used to be 112 process groups (an NCCL
    communicator each, growing with dp squared); now every pair maps to one group."""
    names = [e.name for e in SPEC.encoders]
    plan = ParallelPlan(dp=4, llm_pp=6, microbatches=8, encoder_tp=dict.fromkeys(names, 1))
    layout = roles(plan, names)
    assert len(layout) == 32
    pairs = edges(layout, {n: True for n in names}, replica_pool("entrain", 4))
    created = []
    monkeypatch.setattr(
        comm,
        "dist",
        SimpleNamespace(
            new_group=lambda ranks: created.append(tuple(ranks)) or object(),
            get_world_size=lambda: 32,
            all_reduce=lambda t, group=None: None,
        ),
    )
    channels = comm.p2p_channels(pairs, torch.device("cpu"))
    assert len(pairs) == 2 * 2 * 4 * 4 + 2 * 4 * 5  # encoders x replicas^2, both ways; stages
    assert created == [tuple(range(32))]
    assert set(channels) == set(pairs) and len({id(g) for g in channels.values()}) == 1

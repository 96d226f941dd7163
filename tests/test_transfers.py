"""The p2p order contract under NCCL's rules, without a GPU.

The engine's workers run in threads of one process over an in-memory stand-in for
torch.distributed that behaves as NCCL does at its strictest: tags are ignored, every rank
has one queue for all its operations, a send completes only with the receive at the head of
the peer's queue, and a receive posted ahead holds up everything issued after it. Every
policy, pipeline depth and replica count must finish there with every transfer made, in
order, with the ids the plan says, because every rank issues its operations in the step
program's global order (program/order.py). Receives posted early instead deadlock there
(the negative control).
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
from collections import defaultdict, deque
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import entrain.runtime.comm as comm
from entrain.cost.batch import cost_batch
from entrain.models.load import load_spec
from entrain.program.iteration import IterationPlan
from entrain.program.messages import EMBED_GRAD
from entrain.program.order import Recv, comm_ops, step_program
from entrain.program.transfers import edges, roles, sends
from entrain.runtime.comm import Mailbox, OutOfOrder, Transfer, TransferTimeout
from entrain.runtime.emulate import plan_sample_inputs
from entrain.runtime.engine import EncoderWorker, LLMWorker, StepStats
from entrain.schedule import POLICIES, assign, replica_pool
from entrain.schedule.parallel import ParallelPlan
from entrain.workload.traces import generate_workload


class _Work:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: str | None = None

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        if not self.done.wait(timeout.total_seconds() if timeout else None):
            raise RuntimeError("timed out in the NCCL stand-in")
        if self.error:
            raise RuntimeError(self.error)
        return True


class FakeNCCL:
    """isend/irecv among threads with NCCL's matching. `strict` (the default): every rank has
    one queue for all its operations, whatever the group, and only the heads of two ranks'
    queues can match (one communicator, or CUDA_DEVICE_MAX_CONNECTIONS=1, or a GPU whose
    queues are full). Not strict: one queue per communicator, as when NCCL progresses
    several communicators side by side (which it does not promise)."""

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict
        self.lock = threading.Lock()
        self.queues: dict = defaultdict(deque)
        self.local = threading.local()
        self.carried: dict[tuple[int, int], list[int]] = defaultdict(list)
        """(sender, receiver) -> bytes of each message the wire carried, in order."""

    def get_rank(self) -> int:
        return self.local.rank

    def isend(self, t, dst, tag=0, group=None):
        return self._issue("send", t, dst, group)

    def irecv(self, t, src, tag=0, group=None):
        return self._issue("recv", t, src, group)

    def _queue(self, rank: int, peer: int, group) -> tuple:
        return (rank,) if self.strict else (id(group), rank, peer)

    def _issue(self, kind: str, t: torch.Tensor, peer: int, group) -> _Work:
        me = self.local.rank
        work = _Work()
        with self.lock:
            self.queues[self._queue(me, peer, group)].append((kind, t, peer, group, work))
            self._progress()
        return work

    def _progress(self) -> None:
        moved = True
        while moved:
            moved = False
            for key, q in list(self.queues.items()):
                if not q:
                    continue
                kind, t, peer, group, work = q[0]
                me = key[0] if self.strict else key[1]
                other = self.queues.get(self._queue(peer, me, group))
                if not other:
                    continue
                okind, ot, opeer, _, owork = other[0]
                if okind == kind or opeer != me:
                    continue  # the peer's head is something else: nothing moves here
                send, recv = (t, ot) if kind == "send" else (ot, t)
                if send.numel() != recv.numel():
                    work.error = owork.error = (
                        f"size mismatch: sent {send.numel()}, posted {recv.numel()}"
                    )
                else:
                    recv.copy_(send)
                    pair = (me, peer) if kind == "send" else (peer, me)
                    self.carried[pair].append(send.numel())
                q.popleft()
                other.popleft()
                work.done.set()
                owork.done.set()
                moved = True


def _run_ranks(fake: FakeNCCL, main, n: int) -> None:
    """main(rank) in n threads with comm's torch.distributed replaced by `fake`."""
    old = comm.dist
    comm.dist = SimpleNamespace(get_rank=fake.get_rank, isend=fake.isend, irecv=fake.irecv)
    try:
        threads = [threading.Thread(target=main, args=(r,)) for r in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        comm.dist = old
    assert not any(t.is_alive() for t in threads), "a rank never returned"


class FakeStage:
    """A pipeline stage's interface with one scalar weight: rows and autograd as the real one."""

    def __init__(self, last: bool, width: int):
        self.last, self.width = last, width
        self.w = nn.Parameter(torch.tensor(1.0))

    def embed_sample(self, ids: torch.Tensor, spans, items) -> torch.Tensor:
        base = sum((u.sum() for units in items for u in units), torch.tensor(0.0)) * 1e-3
        return (base + self.w) * torch.ones(1, ids.shape[0], self.width)  # the sequence's rows

    def __call__(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return h * self.w

    def loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return h.sum() * 1e-3


fake_sample = plan_sample_inputs  # inputs with one span per item, rows as the plan counts


def _plan(spec, policy: str, dp: int, pp: int, seed: int, lookahead=1, pool=None, copies=None):
    M, B = 4, 8 * dp
    w = generate_workload("omni", B, seed=seed)
    batch = cost_batch(w, spec)
    asg = assign(policy, batch, dp, M, lookahead if policy == "entrain" else None, pool)
    return IterationPlan.build(batch, asg, spec, pp, w, copies=copies)


def receives_first(ops: list) -> list:
    """A rank's transfers with every receive posted before any send, each pair's order
    kept: what posting receives early (as the runtime did before the step program) amounts
    to on one queue."""
    comm_only = comm_ops(ops)
    return [op for op in comm_only if isinstance(op, Recv)] + [
        op for op in comm_only if not isinstance(op, Recv)
    ]


def run_threads(
    spec,
    it: IterationPlan,
    dp: int,
    pp: int,
    timeout_s: float = 5,
    block: int | None = None,
    copies: dict[str, int] | None = None,
    strict: bool = True,
    order=comm_ops,
    sent: dict | None = None,
):
    """Every rank's worker in a thread over FakeNCCL (`strict`: one queue per rank); the
    errors raised, by rank. `order` turns a rank's step program into what its Mailbox
    issues. `sent`, when given, gets each rank's Mailbox log (key, receiver, bytes) and,
    under "wire", what the stand-in carried per pair."""
    names = [e.name for e in spec.encoders]
    plan = ParallelPlan(
        dp=dp,
        llm_pp=pp,
        microbatches=it.asg.microbatches,
        encoder_tp=dict.fromkeys(names, 1),
        encoder_dp=copies or {},
    )
    layout = roles(plan, names)
    trains = {e.name: not e.frozen for e in spec.encoders}
    fake = FakeNCCL(strict)
    block = dp if block is None else block
    groups = dict.fromkeys(edges(layout, trains, block), object())  # one p2p group, as the runtime
    program = step_program(it, layout, trains)
    errors: dict[int, BaseException] = {}
    weight = nn.Parameter(torch.tensor(1.0))

    def rank_main(rank: int) -> None:
        fake.local.rank = rank
        role = layout[rank]
        mail = Mailbox(datetime.timedelta(seconds=timeout_s), groups=groups)
        try:
            mail.begin(order(program[rank]))
            if role.module != "llm":
                enc = next(e for e in spec.encoders if e.name == role.module)
                width = enc.encoder.hidden_size if enc.frozen else spec.llm.hidden_size

                def encode(units):
                    return [weight * torch.ones(it.unit_rows[enc.name][u], width) for u in units]

                EncoderWorker(role, trains[enc.name], encode).step(
                    it, program[rank], mail, StepStats()
                )
            else:
                projectors = {
                    e.name: nn.Linear(e.encoder.hidden_size, spec.llm.hidden_size)
                    for e in spec.encoders
                    if e.frozen and role.stage == 0
                }
                stage = FakeStage(role.stage == pp - 1, spec.llm.hidden_size)
                worker = LLMWorker(role, stage, lambda s: fake_sample(it, s), projectors, trains)
                worker.step(it, program[rank], mail, StepStats(), 1)
            mail.flush()
            if sent is not None:
                sent[rank] = list(mail.sent)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors[rank] = e

    _run_ranks(fake, rank_main, len(layout))
    if sent is not None:
        sent["wire"] = dict(fake.carried)
    return errors


SPEC = load_spec("tiny")
FROZEN_AUDIO = dataclasses.replace(
    SPEC,
    encoders=(SPEC.encoders[0], dataclasses.replace(SPEC.encoders[1], frozen=True)),
)


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize(("dp", "pp"), [(1, 1), (1, 3), (2, 2)])
def test_every_policy_keeps_the_order_under_nccl_rules(policy, dp, pp):
    torch.set_num_threads(1)
    for seed in range(3):
        spec = FROZEN_AUDIO if seed == 2 else SPEC
        it = _plan(spec, policy, dp, pp, seed)
        errors = run_threads(spec, it, dp, pp, block=replica_pool(policy, dp))
        assert not errors, {r: repr(e) for r, e in errors.items()}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_encoder_copies_keep_the_order_under_nccl_rules(policy):
    """The vision encoder on 3 ranks per replica (2 replicas, 2 stages): each copy sends and
    takes back its share of every encoder microbatch, in the order both sides derive."""
    torch.set_num_threads(1)
    copies = {"vision": 3}
    it = _plan(SPEC, policy, 2, 2, 1, copies=copies)
    assert len(set(it.unit_copy["vision"])) >= 2  # the units really are spread
    errors = run_threads(SPEC, it, 2, 2, block=replica_pool(policy, 2), copies=copies)
    assert not errors, {r: repr(e) for r, e in errors.items()}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_channels_only_within_the_policys_replica_pool(policy):
    """4 replicas, Entrain pooling 2 by 2: every transfer finds the channel the runtime
    opened for it (a transfer outside them would be refused by name)."""
    block = replica_pool(policy, 4, 2)
    assert block == {"encoder-rebalance": 4, "entrain": 2}.get(policy, 1)
    it = _plan(SPEC, policy, 4, 1, 0, pool=2)
    errors = run_threads(SPEC, it, 4, 1, block=block)
    assert not errors, {r: repr(e) for r, e in errors.items()}


def test_a_transfer_without_a_channel_is_refused_by_name():
    it = _plan(SPEC, "entrain", 2, 1, 0)  # pooled over both replicas
    errors = run_threads(SPEC, it, 2, 1, block=1)  # channels opened within replicas only
    assert errors and any("no channel from rank" in str(e) for e in errors.values()), errors


@pytest.mark.parametrize("lookahead", [0, 2, None])
def test_deep_lookahead_keeps_the_order(lookahead):
    for seed in range(3):
        it = _plan(SPEC, "entrain", 2, 2, seed, lookahead)
        assert not run_threads(SPEC, it, 2, 2)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_receives_posted_early_deadlock_on_one_queue(policy):
    """The negative control: the same transfers, each pair's order kept, but every receive
    posted before the rank's sends (early posting, as the two-queue design did) hang as soon
    as one queue carries all of a rank's operations: an encoder's gradient receive sits in
    front of the embeddings the LLM needs to make that gradient."""
    it = _plan(SPEC, policy, 1, 2, 0)
    errors = run_threads(SPEC, it, 1, 2, timeout_s=1, order=receives_first)
    assert errors and all(isinstance(e, TransferTimeout) for e in errors.values()), errors


def test_every_transfer_has_one_sender_and_one_receiver():
    it = _plan(SPEC, "entrain", 2, 2, 1)
    trains = {e.name: True for e in SPEC.encoders}
    layout = roles(ParallelPlan(dp=2, llm_pp=2, microbatches=4), [e.name for e in SPEC.encoders])
    everything = [t for role in layout for t in sends(it, role, layout, trains)]
    keys = [t.key for t in everything]
    assert len(keys) == len(set(keys))
    allowed = set(edges(layout, trains, 2))
    assert all((t.src, t.dst) in allowed for t in everything)
    assert sorted(keys) == sorted(t.key for t in it.messages.transfers())
    # every unit's embedding goes out once, and (encoders train) its gradient comes back once
    for e in SPEC.encoders:
        sent = [u for t in everything if t.key[:2] == ("embed", e.name) for u in t.ids]
        back = [u for t in everything if t.key[:2] == ("embed_grad", e.name) for u in t.ids]
        assert sorted(sent) == sorted(back) == list(range(len(it.units[e.name])))


def _sender_and_receiver(order: list[str]) -> dict[int, BaseException]:
    """Rank 0 sends "a" then "b" in `order`; rank 1 expects the plan's order a, b."""
    fake = FakeNCCL()
    plan = [Transfer(("a",), 0, 1, (1,), 256, "a"), Transfer(("b",), 0, 1, (2,), 256, "b")]
    errors: dict[int, BaseException] = {}

    def main(rank: int) -> None:
        fake.local.rank = rank
        mail = Mailbox(datetime.timedelta(seconds=2))
        try:
            mail.begin(plan)
            if rank == 0:
                for key in order:
                    mail.send((key,), [torch.ones(3, 4)])
            else:
                mail.recv(("b",))
                mail.recv(("a",))
            mail.flush()
        except BaseException as e:  # noqa: BLE001
            errors[rank] = e

    _run_ranks(fake, main, 2)
    return errors


def test_receiver_may_take_in_any_order_the_wire_keeps_the_senders():
    assert not _sender_and_receiver(["a", "b"])


def test_a_send_out_of_the_plans_order_is_refused_by_name():
    errors = _sender_and_receiver(["b", "a"])
    assert isinstance(errors[0], OutOfOrder) and "('a',) first" in str(errors[0])


def test_a_message_larger_than_its_transfer_is_refused():
    fake = FakeNCCL()
    raised: list[BaseException] = []

    def main(rank: int) -> None:
        fake.local.rank = rank
        mail = Mailbox(datetime.timedelta(seconds=1))
        mail.begin([Transfer(("a",), 0, 1, (1,), 64, "embeddings of x")])
        try:
            mail.send(("a",), [torch.ones(10, 10)])
        except comm.TransferTooLarge as e:
            raised.append(e)

    _run_ranks(fake, main, 1)
    assert raised and "embeddings of x" in str(raised[0])


def test_padding_gives_every_message_its_exact_size():
    msg = comm._pack([torch.ones(2, 3), torch.zeros(1, 3)], [7, 8], 512, "cpu")
    assert msg.numel() == 512
    meta, tensors = comm._unpack(msg)
    assert meta == [7, 8] and [tuple(t.shape) for t in tensors] == [(2, 3), (1, 3)]
    assert np.allclose(tensors[0].numpy(), 1.0)


@pytest.mark.parametrize("pp", [1, 2])
def test_a_microbatch_of_only_deferred_samples_runs(pp):
    from test_schedule import all_deferred

    w, batch, asg = all_deferred(SPEC)
    it = IterationPlan.build(batch, asg, SPEC, pp, w)
    table = it.messages  # microbatch 3 returns gradients to encoder microbatch 0 only
    back = (table.kind == EMBED_GRAD) & (table.dest == 0) & (table.j == 3)
    assert back.any() and (table.k[back] == 0).all()
    assert not run_threads(SPEC, it, 1, pp)


def test_a_transfer_sent_twice_is_refused():
    errors = _sender_and_receiver(["a", "a"])
    assert isinstance(errors[0], OutOfOrder) and "has sent it already" in str(errors[0])

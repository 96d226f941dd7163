"""Who holds what: the ranks' roles, the pairs of ranks that may ever exchange a message
(what channels are opened for), each role's computes in order, and a rank's view of the
step's message table (program/messages.py, where every message is derived).

An encoder sends a microbatch's embeddings after its forward, one message per LLM replica
it feeds; an LLM stage sends activations after a forward, and activation gradients (stage >
0) or embedding gradients (stage 0, one message per encoder microbatch and copy it took
units from, trained encoders only) after a backward. Every rank computes the same table
from the same IterationPlan, so the receiver of a pair knows the order the sender will send
in before anything is sent: the contract runtime/comm.py holds both ends to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from entrain.program.iteration import IterationPlan
from entrain.program.messages import PASSES, Transfer
from entrain.schedule.parallel import ParallelPlan
from entrain.schedule.pipeline import encoder_actions, one_f_one_b


@dataclass(frozen=True)
class Role:
    """What a rank holds: an encoder copy (stage is 0) or an LLM stage, in one replica."""

    module: str
    replica: int
    stage: int = 0
    copy: int = 0
    """Which of the encoder's copies in the replica (ParallelPlan.encoder_dp)."""

    @property
    def name(self) -> str:
        """The module group: every copy and replica of a module shares it (and sums
        gradients in it)."""
        return self.module if self.module != "llm" else f"llm.s{self.stage}"

    def device(self, copies: int = 1) -> str:
        """The rank's name in metrics, traces and the simulator ("llm.s1/r0", "vision/r2",
        "vision.c1/r2" when the encoder has `copies` > 1 per replica)."""
        group = f"{self.name}.c{self.copy}" if copies > 1 else self.name
        return f"{group}/r{self.replica}"


def roles(plan: ParallelPlan, encoders: list[str]) -> list[Role]:
    """The role of every rank, rank order (ParallelPlan's layout: per replica, each
    encoder's copies, then LLM stages). The runtime runs each copy of an encoder and each LLM
    stage on one rank (no tensor parallelism yet)."""
    if plan.llm_tp != 1 or any(tp != 1 for tp in plan.encoder_tp.values()):
        raise ValueError(
            f"the runtime has no tensor parallelism yet: plan {plan.describe()} asks for TP > 1"
        )
    out = []
    for r in range(plan.dp):
        for e in encoders:
            out += [Role(e, r, copy=c) for c in range(plan.encoder_dp.get(e, 1))]
        out += [Role("llm", r, s) for s in range(plan.llm_pp)]
    return out


def embed_key(encoder: str, replica: int, k: int, dest: int, copy: int = 0) -> tuple:
    """Embeddings of encoder microbatch k of `replica` (the share of its `copy`) for the LLM
    of replica `dest`."""
    return ("embed", encoder, replica, k, dest, copy)


def embed_grad_key(encoder: str, replica: int, k: int, dest: int, j: int, copy: int = 0) -> tuple:
    """Their gradients from LLM microbatch j of replica `dest`."""
    return ("embed_grad", encoder, replica, k, dest, j, copy)


def act_key(replica: int, stage: int, j: int) -> tuple:
    """Activations of LLM microbatch j from `stage` to the next."""
    return ("act", replica, stage, j)


def act_grad_key(replica: int, stage: int, j: int) -> tuple:
    """Activation gradients of LLM microbatch j from `stage` to the one before."""
    return ("act_grad", replica, stage, j)


def feeds(src: Role, dst: Role, trains: dict[str, bool], block: int) -> bool:
    """Whether `src` may ever send to `dst`: an encoder to the first LLM stage of a replica
    in its block of `block` replicas (schedule.replica_pool; 1 when units stay on their
    replica) and that stage back to a trained encoder, neighbouring LLM stages of a replica
    both ways. The shape of the pipeline, before any plan: what channels are opened for,
    and whose transfers a rank has to work out."""
    if src.module != "llm" or dst.module != "llm":
        enc, llm = (src, dst) if src.module != "llm" else (dst, src)
        back = enc is dst
        return (
            llm.module == "llm"
            and llm.stage == 0
            and enc.replica // block == llm.replica // block
            and (not back or trains[enc.module])
        )
    return src.replica == dst.replica and abs(src.stage - dst.stage) == 1


def edges(layout: list[Role], trains: dict[str, bool], block: int) -> list[tuple[int, int]]:
    """Every (src, dst) pair of ranks that may carry a transfer in some iteration. Fewer
    pairs, fewer process groups (on NCCL, communicators with their own buffers)."""
    return [
        (i, j)
        for i, a in enumerate(layout)
        for j, b in enumerate(layout)
        if i != j and feeds(a, b, trains, block)
    ]


def action_list(it: IterationPlan, role: Role, trains: dict[str, bool]) -> list[tuple[str, int]]:
    """The role's (pass, microbatch) computes in the order it runs them (schedule/pipeline.py:
    1F1B on an LLM stage; an encoder's forwards ahead, its backwards as gradients return)."""
    P = it.llm_stages
    if role.module == "llm":
        return [(kind, int(k)) for kind, k in one_f_one_b(P, role.stage, it.asg.microbatches)]
    need = it.need(role.module, role.replica)
    return [(kind, int(k)) for kind, k in encoder_actions(need, P, trains[role.module])]


def sends(
    it: IterationPlan, role: Role, layout: list[Role], trains: dict[str, bool]
) -> list[Transfer]:
    """The transfers `role` sends in the step, in the order it makes them (its computes'
    order; one compute's in the table's order): a view of the table, for checks."""
    table = it.messages
    if table.ranks.world != len(layout):
        raise ValueError(
            f"the step's messages are for {table.ranks.world} ranks, not {len(layout)}"
        )
    me = layout.index(role)
    position = {a: i for i, a in enumerate(action_list(it, role, trains))}
    rows = np.flatnonzero(table.src == me).tolist()
    rows.sort(key=lambda i: position[PASSES[table.make[i, 0]], int(table.make[i, 1])])
    return [table.transfer(i) for i in rows]

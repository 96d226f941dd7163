"""Who holds what, and every transfer of an iteration in the order its sender sends it.

Every rank computes the same list from the same IterationPlan, so the receiver of a pair
knows the order the sender will send in before anything is sent: the contract runtime/comm.py
holds both ends to (NCCL matches sends and receives per pair in issue order). The list is
derived from the action lists of schedule/pipeline.py, the ones the engine runs: an encoder
sends a microbatch's embeddings after its forward, one message per LLM replica it feeds; an
LLM stage sends activations after a forward, and activation gradients (stage > 0) or
embedding gradients (stage 0, one message per encoder microbatch it took units from, trained
encoders only) after a backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from entrain.program.iteration import IterationPlan
from entrain.program.messages import Transfer
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


def sends(
    it: IterationPlan, role: Role, layout: list[Role], trains: dict[str, bool]
) -> list[Transfer]:
    """The transfers `role` sends in the iteration, in the order it sends them."""
    rank = {r: i for i, r in enumerate(layout)}
    me = rank[role]
    P, M = it.llm_stages, it.asg.microbatches
    out: list[Transfer] = []
    if role.module != "llm":
        e, r, c = role.module, role.replica, role.copy
        for kind, k in encoder_actions(it.need(e, r), P, trains[e]):
            if kind != "F":
                continue
            for d, us in it.sends_of(e, r, k, c).items():
                out.append(
                    Transfer(
                        embed_key(e, r, k, d, c),
                        me,
                        rank[Role("llm", d, 0)],
                        tuple(us),
                        it.embed_cap(e, us),
                        f"{e} embeddings of encoder microbatch {k} (replica {r}, copy {c})",
                    )
                )
        return out
    r, s = role.replica, role.stage
    for kind, j in one_f_one_b(P, s, M):
        samples = tuple(it.llm_mb.get((r, j), []))
        if kind == "F" and s < P - 1:
            out.append(
                Transfer(
                    act_key(r, s, j),
                    me,
                    rank[Role("llm", r, s + 1)],
                    samples,
                    it.act_cap(list(samples)),
                    f"activations of LLM microbatch {j} from stage {s}",
                )
            )
        elif kind == "B" and s > 0:
            out.append(
                Transfer(
                    act_grad_key(r, s, j),
                    me,
                    rank[Role("llm", r, s - 1)],
                    samples,
                    it.act_cap(list(samples)),
                    f"activation gradients of LLM microbatch {j} from stage {s}",
                )
            )
        elif kind == "B":
            for (e, rs, k, c), us in it.embed_sources(r, j).items():
                if trains[e]:
                    out.append(
                        Transfer(
                            embed_grad_key(e, rs, k, r, j, c),
                            me,
                            rank[Role(e, rs, copy=c)],
                            tuple(us),
                            it.embed_cap(e, us),
                            f"gradients of {e} microbatch {k} (replica {rs}, copy {c}) "
                            f"from LLM microbatch {j} (replica {r})",
                        )
                    )
    return out


def transfers_of(
    it: IterationPlan, rank: int, layout: list[Role], trains: dict[str, bool]
) -> list[Transfer]:
    """The iteration's transfers that start or end at `rank`, each sender's in its order.
    Only ranks that can send here are worked out (all replicas count as one block: the
    plan, not the channels, says where units went)."""
    me = layout[rank]
    mine = sends(it, me, layout, trains)
    for other in layout:
        if other != me and feeds(other, me, trains, it.asg.dp):
            mine += [t for t in sends(it, other, layout, trains) if t.dst == rank]
    return mine

"""One training iteration on one rank: an encoder or an LLM pipeline stage of one replica.

Both roles run their rank's list of the step program (program/order.py): its computes in
order (the pipeline action lists the simulator replays too), each after taking the
transfers the list says it needs and followed by sending those it makes; which message
carries what is the step's message table's (program/messages.py), never worked out here.
The Mailbox issues the sends and receives in the program's global order. An encoder runs its
microbatches' forwards, sends each unit's embedding to the first LLM stage of the replica
that owns the sample, and runs a microbatch's backward once the gradients of all its units
are back. LLM stages run 1F1B; the first stage waits for the
embeddings of every sample of a microbatch before its forward (deferral is waiting).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from entrain.program.iteration import IterationPlan
from entrain.program.order import Compute, Op
from entrain.program.transfers import Role
from entrain.runtime.comm import Mailbox
from entrain.runtime.device import sync
from entrain.runtime.modules import LLMStage
from entrain.runtime.setup import SampleInputs


@dataclass
class StepStats:
    busy: float = 0.0
    events: list[tuple[str, float, float]] = field(default_factory=list)
    peak_deferred: int = 0
    """Most embedding rows held at once for a later LLM microbatch than the running one."""
    first_done: Callable[[], None] | None = None
    """Called once, when the step's first compute is done (the trainer starts planning the
    next step then)."""

    def timed(self, label: str, t0: float) -> None:
        sync()  # on a GPU, the action's kernels, not their launch
        t1 = time.perf_counter()
        self.busy += t1 - t0
        self.events.append((label, t0, t1))
        if self.first_done is not None:
            self.first_done, call = None, self.first_done
            call()


def _grad(x: torch.Tensor) -> torch.Tensor:
    """The gradient a leaf received, or zeros when backward did not reach it."""
    return x.grad if x.grad is not None else torch.zeros_like(x)


class EncoderWorker:
    """An encoder rank. `encode(units)` returns one embedding tensor per unit (LLM width when
    the encoder trains; the trunk's states when it is frozen and its projector runs on the
    LLM side)."""

    def __init__(
        self,
        role: Role,
        trains: bool,
        encode: Callable[[list[int]], list[torch.Tensor]],
    ):
        self.role, self.trains, self.encode = role, trains, encode

    def step(
        self,
        it: IterationPlan,
        program: list[Op],
        mail: Mailbox,
        stats: StepStats,
        before_last_backward: Callable[[], None] | None = None,
    ) -> None:
        """Run this rank's computes of the step program, each after taking the transfers it
        needs, and send what each makes."""
        e, r, c = self.role.module, self.role.replica, self.role.copy
        outputs: dict[int, list[torch.Tensor]] = {}
        computes = [op for op in program if isinstance(op, Compute)]
        last_b = max((i for i, op in enumerate(computes) if op.kind == "B"), default=-1)
        for i, op in enumerate(computes):
            if i == last_b and before_last_backward:
                before_last_backward()
            k = op.mb
            units = it.copy_units(e, r, k, c)
            t0 = time.perf_counter()
            if op.kind == "F":
                with torch.set_grad_enabled(self.trains):
                    embs = self.encode(units) if units else []
                by_unit = dict(zip(units, embs))
                outputs[k] = embs
                stats.timed(f"F{k}", t0)
                for t in op.makes:  # one message per LLM replica its units feed
                    mail.send(t.key, [by_unit[u] for u in t.ids])
            else:
                grads: dict[int, torch.Tensor] = {}
                for t in op.needs:  # one message per LLM microbatch that used its units
                    meta, tensors = mail.recv(t.key)
                    grads.update(zip(meta, tensors))
                t0 = time.perf_counter()
                if units:
                    torch.autograd.backward(outputs[k], [grads[u] for u in units])
                outputs.pop(k, None)
                stats.timed(f"B{k}", t0)


def span_items(
    it: IterationPlan, smp: int, spans, embedding: Callable[[str, int], torch.Tensor]
) -> list[list[torch.Tensor]]:
    """Per span of sample `smp` (in sequence order), the embeddings of its item's units in
    chunk order: what `LLMStage.embed_sample` puts in the span's rows."""
    by_item: dict[tuple[str, int], list[torch.Tensor]] = {}
    for e, u in it.prefix[smp]:
        ref = it.units[e][u]
        by_item.setdefault((ref.modality, ref.item), []).append(embedding(e, u))
    return [by_item.get((sp.modality, sp.item), []) for sp in spans]


class LLMWorker:
    """An LLM pipeline stage. Stage 0 builds each sample's sequence from its tokens and the
    received unit embeddings (through the LLM-side projector of a frozen encoder), each
    where its placeholder stands."""

    def __init__(
        self,
        role: Role,
        stage: LLMStage,
        sample: Callable[[int], SampleInputs],
        projectors: dict[str, nn.Module],
        encoder_trains: dict[str, bool],
    ):
        self.role, self.stage, self.sample = role, stage, sample
        self.projectors, self.encoder_trains = projectors, encoder_trains

    def step(
        self,
        it: IterationPlan,
        program: list[Op],
        mail: Mailbox,
        stats: StepStats,
        loss_tokens: int,
        before_last_backward: Callable[[], None] | None = None,
    ) -> float:
        """Run this rank's computes of the step program (1F1B), each after taking the
        transfers it needs, and send what each makes; the step's summed loss (last stage)."""
        r, s = self.role.replica, self.role.stage
        received: dict[tuple[str, int], torch.Tensor] = {}
        inputs: dict[int, list[torch.Tensor]] = {}
        outs: dict[int, list[torch.Tensor]] = {}
        losses: dict[int, torch.Tensor] = {}
        total = 0.0
        computes = [op for op in program if isinstance(op, Compute)]
        last_b = max(i for i, op in enumerate(computes) if op.kind == "B")
        for i, op in enumerate(computes):
            if i == last_b and before_last_backward:
                before_last_backward()  # gradients become final in this backward
            j = op.mb
            samples = it.llm_mb.get((r, j), [])
            if op.kind == "F":
                xs = None
                for t in op.needs:  # stage 0: embeddings, each from the first that uses it
                    meta, tensors = mail.recv(t.key)
                    if s > 0:
                        xs = [x.requires_grad_(True) for x in tensors]
                        continue
                    e = t.key[1]
                    for u, x in zip(meta, tensors):
                        received[(e, u)] = x.requires_grad_(self.encoder_trains[e])
                if s == 0:  # deferral, measured: embeddings here for a later microbatch
                    later = sum(
                        x.shape[0] for (e, u), x in received.items() if it.unit_dest(e, u)[1] > j
                    )
                    stats.peak_deferred = max(stats.peak_deferred, later)
                t0 = time.perf_counter()
                hidden_in, hidden_out, loss = [], [], None
                for n, smp in enumerate(samples):
                    inp = self.sample(smp)
                    if s == 0:
                        items = span_items(
                            it, smp, inp.spans, lambda e, u: self._embedding(e, u, received)
                        )
                        h = self.stage.embed_sample(inp.ids, inp.spans, items)
                    else:
                        h = xs[n].unsqueeze(0)
                        hidden_in.append(xs[n])
                    h = self.stage(h, inp.positions)
                    if self.stage.last:
                        lo = self.stage.loss(h, inp.labels) / loss_tokens
                        loss = lo if loss is None else loss + lo
                    else:
                        hidden_out.append(h[0])
                inputs[j], outs[j] = hidden_in, hidden_out
                if loss is not None:
                    losses[j] = loss
                    total += float(loss.detach()) * loss_tokens
                stats.timed(f"F{j}", t0)
                for t in op.makes:  # the activations, to the next stage
                    mail.send(t.key, hidden_out)
            else:
                grads = None
                for t in op.needs:  # the next stage's activation gradients
                    _, grads = mail.recv(t.key)
                t0 = time.perf_counter()
                if self.stage.last:
                    if j in losses:
                        losses.pop(j).backward()
                elif outs[j]:
                    torch.autograd.backward(outs[j], grads)
                outs.pop(j, None)
                stats.timed(f"B{j}", t0)
                for t in op.makes:  # to the stage before, or each trained encoder's units
                    if t.key[0] == "act_grad":
                        mail.send(t.key, [_grad(x) for x in inputs[j]])
                    else:
                        e = t.key[1]
                        mail.send(t.key, [_grad(received[(e, u)]) for u in t.ids])
                inputs.pop(j, None)
                for smp in samples if s == 0 else ():  # their embeddings are done with
                    for e, u in it.prefix[smp]:
                        received.pop((e, u), None)
        return total

    def _embedding(self, e: str, u: int, received: dict) -> torch.Tensor:
        x = received[(e, u)]
        return self.projectors[e](x) if e in self.projectors else x

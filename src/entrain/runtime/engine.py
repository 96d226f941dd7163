"""One training iteration on one rank: an encoder or an LLM pipeline stage of one replica.

Both roles run their computes in the step program's order (program/order.py: the pipeline
action lists the simulator replays too) and leave the order of their sends and receives to
the Mailbox, which issues them in the program's global order. An encoder runs its
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
from entrain.program.order import actions_of
from entrain.program.transfers import Role, act_grad_key, act_key, embed_grad_key, embed_key
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

    def timed(self, label: str, t0: float) -> None:
        sync()  # on a GPU, the action's kernels, not their launch
        t1 = time.perf_counter()
        self.busy += t1 - t0
        self.events.append((label, t0, t1))


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
        mail: Mailbox,
        stats: StepStats,
        before_last_backward: Callable[[], None] | None = None,
    ) -> None:
        e, r, c = self.role.module, self.role.replica, self.role.copy
        outputs: dict[int, list[torch.Tensor]] = {}
        actions = [(a.kind, a.mb) for a in actions_of(it, self.role, {e: self.trains})]
        last_b = max((i for i, (kind, _) in enumerate(actions) if kind == "B"), default=-1)
        for i, (kind, k) in enumerate(actions):
            if i == last_b and before_last_backward:
                before_last_backward()
            units = it.copy_units(e, r, k, c)
            t0 = time.perf_counter()
            if kind == "F":
                with torch.set_grad_enabled(self.trains):
                    embs = self.encode(units) if units else []
                by_unit = dict(zip(units, embs))
                outputs[k] = embs
                stats.timed(f"F{k}", t0)
                for dest, us in it.sends_of(e, r, k, c).items():
                    mail.send(embed_key(e, r, k, dest, c), [by_unit[u] for u in us])
            else:
                grads: dict[int, torch.Tensor] = {}
                for dest, j in it.grad_sources(e, r, k, c):
                    meta, tensors = mail.recv(embed_grad_key(e, r, k, dest, j, c))
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
        mail: Mailbox,
        stats: StepStats,
        loss_tokens: int,
        before_last_backward: Callable[[], None] | None = None,
    ) -> float:
        r, s = self.role.replica, self.role.stage
        received: dict[tuple[str, int], torch.Tensor] = {}
        got: set = set()
        inputs: dict[int, list[torch.Tensor]] = {}
        outs: dict[int, list[torch.Tensor]] = {}
        losses: dict[int, torch.Tensor] = {}
        total = 0.0
        actions = [(a.kind, a.mb) for a in actions_of(it, self.role, self.encoder_trains)]
        last_b = max(i for i, (kind, _) in enumerate(actions) if kind == "B")
        for i, (kind, j) in enumerate(actions):
            if i == last_b and before_last_backward:
                before_last_backward()  # gradients become final in this backward
            samples = it.llm_mb.get((r, j), [])
            if kind == "F":
                if s == 0:
                    for src in it.embed_sources(r, j):
                        if src not in got:
                            e, rs, k, c = src
                            meta, tensors = mail.recv(embed_key(e, rs, k, r, c))
                            for u, t in zip(meta, tensors):
                                received[(e, u)] = t.requires_grad_(self.encoder_trains[e])
                            got.add(src)
                    # deferral, measured: embeddings here for a later microbatch than this one
                    later = sum(
                        t.shape[0] for (e, u), t in received.items() if it.unit_dest(e, u)[1] > j
                    )
                    stats.peak_deferred = max(stats.peak_deferred, later)
                    xs = None
                else:
                    _, xs = mail.recv(act_key(r, s - 1, j))
                    xs = [x.requires_grad_(True) for x in xs]
                t0 = time.perf_counter()
                hidden_in, hidden_out, loss = [], [], None
                for i, smp in enumerate(samples):
                    inp = self.sample(smp)
                    if s == 0:
                        items = span_items(
                            it, smp, inp.spans, lambda e, u: self._embedding(e, u, received)
                        )
                        h = self.stage.embed_sample(inp.ids, inp.spans, items)
                    else:
                        h = xs[i].unsqueeze(0)
                        hidden_in.append(xs[i])
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
                if not self.stage.last:
                    mail.send(act_key(r, s, j), hidden_out)
            else:
                if self.stage.last:
                    t0 = time.perf_counter()
                    if j in losses:
                        losses.pop(j).backward()
                else:
                    _, grads = mail.recv(act_grad_key(r, s + 1, j))
                    t0 = time.perf_counter()
                    if outs[j]:
                        torch.autograd.backward(outs[j], grads)
                outs.pop(j, None)
                stats.timed(f"B{j}", t0)
                if s > 0:
                    mail.send(act_grad_key(r, s, j), [_grad(x) for x in inputs.pop(j)])
                else:
                    self._return_embedding_grads(it, r, j, received, mail)
        return total

    def _embedding(self, e: str, u: int, received: dict) -> torch.Tensor:
        x = received[(e, u)]
        return self.projectors[e](x) if e in self.projectors else x

    def _return_embedding_grads(
        self, it: IterationPlan, r: int, j: int, received: dict, mail: Mailbox
    ) -> None:
        for (e, rs, k, c), us in it.embed_sources(r, j).items():
            if not self.encoder_trains[e]:
                continue
            mail.send(embed_grad_key(e, rs, k, r, j, c), [_grad(received[(e, u)]) for u in us])
            for u in us:
                received.pop((e, u), None)

"""The single-process reference: every module in one process, the whole global batch in
one pass. The distributed runtime must end each step with the same parameters; this is the
test that deferral, pooling and decoupled microbatches change nothing but speed."""

from __future__ import annotations

import dataclasses

import torch

from entrain.runtime.engine import span_items
from entrain.runtime.setup import (
    Dataset,
    TrainConfig,
    encode_units,
    make_step,
    open_dataset,
    source_of,
)


def loss_tokens(data: Dataset, indices) -> int:
    """Next-token targets of a global batch: the normalizer of its loss."""
    return max(1, sum(data.tokens(int(i)).targets for i in indices))


def optimizer(params, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, foreach=False)


def reference_params(
    cfg: TrainConfig,
    steps: int | None = None,
    grads: dict[str, torch.Tensor] | None = None,
    losses: list[float] | None = None,
) -> dict[str, torch.Tensor]:
    """Named parameters after `steps` optimizer steps (default cfg.steps); `grads`, when
    given, receives for each weight its smallest nonzero gradient over the steps, and
    `losses` each step's loss."""
    source = source_of(cfg)
    spec = source.spec
    data = open_dataset(cfg, source)
    cpu = torch.device("cpu")
    towers, named = {}, {}
    for e in spec.encoders:
        towers[e.name], part = source.encoder(e.name, cpu)
        named.update(part)
    projectors = {}
    for e in spec.encoders:
        if e.frozen:
            projectors[e.name], part = source.llm_projector(e.name, cpu)
            named.update(part)
    stage, part = source.llm_stage(0, 1, cpu)
    named.update(part)
    opt = optimizer([p for p in named.values() if p.requires_grad], cfg.lr)
    one = dataclasses.replace(
        cfg, policy="sequential", dp=1, microbatches=1, lookahead=None, pool=None
    )
    for step in range(cfg.steps if steps is None else steps):
        st = make_step(data, one, step, 1)
        norm = loss_tokens(data, st.indices)
        embs = {}
        for enc in spec.encoders:
            units = list(range(len(st.plan.units[enc.name])))
            if not units:
                continue
            out = encode_units(towers[enc.name], enc, data, st, units, trains=not enc.frozen)
            if enc.frozen:
                out = [projectors[enc.name](x) for x in out]
            embs[enc.name] = out
        total = None
        for s in range(st.batch.n_samples):
            inp = data.inputs(int(st.indices[s]))
            items = span_items(st.plan, s, inp.spans, lambda e, u, embs=embs: embs[e][u])
            h = stage(stage.embed_sample(inp.ids, inp.spans, items), inp.positions)
            lo = stage.loss(h, inp.labels) / norm
            total = lo if total is None else total + lo
        if losses is not None:
            losses.append(float(total.detach()))
        total.backward()
        if grads is not None:  # per weight, its smallest nonzero gradient over the steps
            for n, p in named.items():
                if p.grad is None:
                    continue
                g = p.grad.clone()
                if n in grads:
                    prev = grads[n]
                    smaller = (g.abs() < prev.abs()) & (g != 0) | (prev == 0)
                    g = torch.where(smaller, g, prev)
                grads[n] = g
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in named.items()}

"""The single-process reference: every module in one process, the whole global batch in
one pass. The distributed runtime must end each step with the same parameters; this is the
test that deferral, pooling and decoupled microbatches change nothing but speed."""

from __future__ import annotations

import dataclasses

import torch

from entrain.config import recompute_of
from entrain.runtime.engine import span_items
from entrain.runtime.modules import enable_recompute
from entrain.runtime.optim import (
    clip_coefficient,
    compute_context,
    local_sq_norm,
    optimizer,
    resolve_precision,
    scale_grads,
    set_lr,
)
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


def reference_params(
    cfg: TrainConfig,
    steps: int | None = None,
    grads: dict[str, torch.Tensor] | None = None,
    losses: list[float] | None = None,
    step_grads: list[dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Named parameters after `steps` optimizer steps (default cfg.steps), with the run's
    numerics (precision, recompute, weight decay groups, schedule, clipping); `grads`, when
    given, receives for each weight its smallest nonzero gradient over the steps, `losses`
    each step's loss, `step_grads` each step's (clipped) gradients."""
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
    precision = resolve_precision(cfg.precision, cpu)
    compute = compute_context(precision, cpu)
    recompute = recompute_of(cfg.recompute)
    for name, module in [*towers.items(), ("llm", stage)]:
        if recompute.get(name, recompute["*"]) == "full":
            enable_recompute(module)
    opt = optimizer(named, cfg.lr, cfg.weight_decay, cpu)
    one = dataclasses.replace(
        cfg, policy="sequential", dp=1, microbatches=1, lookahead=None, pool=None
    )
    for step in range(cfg.steps if steps is None else steps):
        st = make_step(data, one, step, 1)
        norm = loss_tokens(data, st.indices)
        with compute():
            total = _forward(spec, towers, projectors, stage, data, st, norm)
        if losses is not None:
            losses.append(float(total.detach()))
        total.backward()
        trained = [p for p in named.values() if p.requires_grad]
        norm2 = float(local_sq_norm(trained).sqrt())
        scale_grads(trained, clip_coefficient(norm2, cfg.clip_grad))
        if step_grads is not None:
            step_grads.append({n: p.grad.clone() for n, p in named.items() if p.grad is not None})
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
        set_lr(opt, cfg.lr_at(step))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in named.items()}


def _forward(spec, towers, projectors, stage, data, st, norm) -> torch.Tensor:
    """The whole global batch's loss in one pass: every encoder on all its units, then the
    LLM on every sample."""
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
        items = span_items(st.plan, s, inp.spans, lambda e, u: embs[e][u])
        h = stage(stage.embed_sample(inp.ids, inp.spans, items), inp.positions)
        lo = stage.loss(h, inp.labels) / norm
        total = lo if total is None else total + lo
    return total

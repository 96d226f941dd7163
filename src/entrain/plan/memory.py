"""Per-rank memory of a plan, as the runtime spends it.

What a rank holds, by the runtime's own choices (`MemorySettings`: precision, recompute,
optimizer sharding, Entrain's deferral depth):

- Parameters in fp32 ("master weights"), their fp32 gradients, and AdamW's two fp32 moments,
  sharded over the module's data-parallel group (replicas x encoder copies) under ZeRO-1.
  Under bf16 autocast, one bf16 copy of each matrix for the step (autocast's cast cache).
  A frozen module holds its weights only.
- Activations saved for backward, per microbatch in flight: tokens x layers x the bytes a
  layer saves per token, measured for the runtime's modules (benchmarks/calibrate_memory.py:
  a linear fit in hidden, FFN and K/V widths, within 1.2% on the measured stacks). With
  full recompute a layer keeps only its fp32 input, and one layer's activations are live
  during its backward. In flight: 1F1B's P - s microbatches on LLM stage s; on an encoder,
  as many as its action list (schedule/pipeline.py) has forwards ahead of backwards, which
  Entrain's deferral depth sets.
- Stage 0 holds the embeddings of its microbatches in flight and those deferred to later
  microbatches (`deferred_tokens`); the last stage the logits of a microbatch's targets.

tests/test_memory.py holds the estimate to the peak that torch's memory profiler measures
on the runtime's ranks for three layouts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from entrain.cost.flops import module_params
from entrain.models.spec import ModelSpec, TransformerSpec, VisionSpec
from entrain.schedule.parallel import ParallelPlan
from entrain.schedule.pipeline import encoder_actions

# bytes a layer saves per token: (per hidden unit, per FFN unit, per K/V unit), measured by
# benchmarks/calibrate_memory.py (transformers 5.24, torch 2.13; CPU, sdpa)
LAYER_BYTES = {
    ("fp32", "llm"): (32.3, 15.9, 8.3),
    ("fp32", "vision"): (44.2, 12.0, 0.0),
    ("fp32", "audio"): (24.2, 8.0, 0.0),
    ("bf16", "llm"): (30.3, 7.9, 4.3),
    ("bf16", "vision"): (22.2, 6.0, 0.0),
    ("bf16", "audio"): (16.2, 4.0, 0.0),
}
ADAM_BYTES = 8  # two fp32 moments


@dataclass(frozen=True, kw_only=True)
class MemorySettings:
    """The runtime's choices that memory depends on (`entrain train`'s flags)."""

    precision: str = "bf16"
    """fp32, or bf16 autocast (fp32 weights, gradients and optimizer state either way)."""
    recompute: dict[str, bool] = field(default_factory=lambda: {"*": True})
    """Module -> full activation recompute ("*": the modules not named)."""
    shard_optimizer: bool = True
    """ZeRO-1 over each module's data-parallel group."""
    lookahead: int | None = 1
    """Entrain's deferral depth (None: unlimited), which sets an encoder's microbatches in
    flight."""

    def recomputes(self, module: str) -> bool:
        return self.recompute.get(module, self.recompute.get("*", False))


def _layer_bytes(t: TransformerSpec, kind: str, precision: str) -> float:
    ah, ai, akv = LAYER_BYTES[(precision, kind)]
    return ah * t.hidden_size + ai * t.intermediate_size + akv * t.num_key_value_heads * t.head_dim


def _static(params: float, trained: bool, shard: int, precision: str) -> float:
    """Weights, gradients and optimizer state of `params` on one rank."""
    cast = 2 * params if precision == "bf16" else 0.0  # autocast's bf16 copy of the weights
    if not trained:
        return 4 * params + cast
    return 8 * params + ADAM_BYTES * params / shard + cast


def _activations(
    tokens: float, layers: int, per_layer: float, in_flight: int, recompute: bool, hidden: int
) -> float:
    """Saved activations of `in_flight` microbatches of `tokens` each; with recompute, each
    layer's fp32 input, and the layer being recomputed in backward."""
    if recompute:
        return in_flight * tokens * layers * hidden * 4 + tokens * per_layer
    return in_flight * tokens * layers * per_layer


def encoder_in_flight(
    microbatches: int, llm_stages: int, lookahead: int | None, need: np.ndarray | None = None
) -> int:
    """Most encoder microbatches forwarded and not yet backwarded, by the action list: for
    `need` (a step's: the last LLM microbatch each encoder microbatch feeds), or for the
    deepest deferral `lookahead` allows."""
    M = microbatches
    ahead = M if lookahead is None else lookahead
    if need is None:
        need = np.minimum(np.arange(M) + ahead, M - 1)
    live = peak = 0
    for kind, _ in encoder_actions(need, llm_stages, True):
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def _stage_params(spec: ModelSpec, stage: int, stages: int) -> float:
    """Parameters of LLM stage `stage`: its layers, with the embedding on the first and the
    head on the last (and the projectors of frozen encoders on the first)."""
    t = spec.llm
    h, V, L = t.hidden_size, t.vocab_size, t.num_hidden_layers
    layer = (module_params(spec)["llm"] - 2 * V * h) / L  # includes frozen projectors / L
    base, extra = divmod(L, stages)
    layers = base + (1 if stage < extra else 0)
    return layers * layer + (V * h if stage == 0 else 0) + (V * h if stage == stages - 1 else 0)


def plan_memory(
    spec: ModelSpec,
    plan: ParallelPlan,
    max_mb_tokens: dict[str, float],
    deferred_tokens: float = 0.0,
    settings: MemorySettings | None = None,
    encoder_flight: dict[str, int] | None = None,
) -> dict[str, float]:
    """Peak bytes on one rank of each module group (the LLM: its heaviest stage).

    `max_mb_tokens[module]` is the largest microbatch of that module in tokens (encoder
    positions for an encoder, LLM tokens for the LLM); `deferred_tokens` the embeddings the
    first LLM stage holds for later microbatches; `encoder_flight[encoder]` its most
    microbatches in flight when known (a step's actual assignment), else what the deferral
    depth allows. Tensor parallelism divides a module's weights and activations by its degree
    (the simulator's model; the runtime has none).
    """
    s = settings or MemorySettings()
    P, tp, M = plan.llm_pp, plan.llm_tp, plan.microbatches
    llm = spec.llm
    wire = 2 if s.precision == "bf16" else 4
    shard = plan.dp if s.shard_optimizer else 1
    per_layer = _layer_bytes(llm, "llm", s.precision) / tp
    tokens = max_mb_tokens["llm"]
    stages = []
    for st in range(P):
        layers = len(range(*_stage_range(llm.num_hidden_layers, P, st)))
        mem = _static(_stage_params(spec, st, P) / tp, not spec.llm_frozen, shard, s.precision)
        mem += _activations(
            tokens, layers, per_layer, min(P - st, M), s.recomputes("llm"), llm.hidden_size
        )
        if st == 0:
            mem += (min(P, M) * tokens + deferred_tokens) * llm.hidden_size * wire
        if st == P - 1:
            mem += tokens * llm.vocab_size / tp * 4 * 2  # fp32 logits and their gradient
        stages.append(mem)
    out = {"llm": max(stages)}
    params = module_params(spec)
    for e in spec.encoders:
        etp, copies = plan.encoder_tp[e.name], plan.encoder_dp.get(e.name, 1)
        t = e.encoder
        kind = "vision" if isinstance(e, VisionSpec) else "audio"
        enc_tokens = max_mb_tokens[e.name] / copies
        layer = _layer_bytes(t, kind, s.precision) / etp
        static = _static(
            params[e.name] / etp,
            not e.frozen,
            plan.dp * copies if s.shard_optimizer else 1,
            s.precision,
        )
        if e.frozen:  # forward only: one layer's transient activations
            out[e.name] = static + enc_tokens * layer
            continue
        flight = (encoder_flight or {}).get(e.name) or encoder_in_flight(M, P, s.lookahead)
        acts = _activations(
            enc_tokens, t.num_hidden_layers, layer, flight, s.recomputes(e.name), t.hidden_size
        )
        out[e.name] = static + acts + flight * enc_tokens * _stem_bytes(e)
    return out


def _stage_range(layers: int, stages: int, stage: int) -> tuple[int, int]:
    base, extra = divmod(layers, stages)
    start = stage * base + min(stage, extra)
    return start, start + base + (1 if stage < extra else 0)


def _stem_bytes(e) -> float:
    """Bytes per encoder position held outside the blocks, in fp32: a ViT's patch pixels
    (the microbatch's input, which its patch convolution keeps) and its merger (a norm over
    each patch, an MLP over groups of merge^2 patches); a Whisper encoder's two convolutions
    (two mel frames in, two widths out, their GELUs, a position embedding added) and its
    pooling projector. The decoded inputs the loader caches are not counted: --cache-mb
    bounds them."""
    h = e.encoder.hidden_size
    if isinstance(e, VisionSpec):
        pixels = e.num_channels * e.temporal_patch_size * e.patch_size**2
        return 4 * (pixels + 3 * h + 2 * e.projector_hidden / e.merge_size**2)
    return 4 * (2 * e.n_mels + 6 * h + h + 2 * e.projector_hidden / e.downsample)

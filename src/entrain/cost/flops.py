"""The analytic cost model: FLOPs of a unit as `a*x + b*x**2 + c0` of its x tokens, forward
and backward apart (the simulator needs them apart, the balancer their sum).

`a` collects every GEMM (attention projections, FFN, patch embedding, projector, LM head),
`b` the attention scores and their weighted sum, per layer. Backward: a trainable module does
input-gradient and weight-gradient GEMMs (2x forward); a frozen module that must pass
gradients upstream only the input gradients (1x); a frozen encoder nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from entrain.models.spec import AudioSpec, ModelSpec, TransformerSpec, VisionSpec


@dataclass(frozen=True)
class CostCoeffs:
    """Cost of one unit with x tokens: a*x + b*x^2 + c0.

    `call` is the fixed cost of one run of the module on a non-empty microbatch, whatever is
    in it (kernel launches, Python, a mask built once): zero in the FLOPs model, real in a
    measured profile. Balancing ignores it (every microbatch pays it alike); the simulator
    charges it once per action.
    """

    a: float
    b: float = 0.0
    c0: float = 0.0
    call: float = 0.0

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return self.a * x + self.b * x * x + self.c0 * (x > 0)


@dataclass(frozen=True)
class ModuleCost:
    """Forward and backward cost of one unit of a module; calling it gives their sum, which
    is what a microbatch's module work is when balancing."""

    forward: CostCoeffs
    backward: CostCoeffs

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        return self.forward(x) + self.backward(x)

    @property
    def a(self) -> float:
        return self.forward.a + self.backward.a

    @property
    def b(self) -> float:
        return self.forward.b + self.backward.b

    @property
    def c0(self) -> float:
        return self.forward.c0 + self.backward.c0


@dataclass(frozen=True)
class CostModel:
    """Per-module costs. Encoders cost per unit (x = its encoder positions), the LLM per
    sample (x = its LLM tokens; samples are packed with per-sample attention, so each
    sample's score FLOPs stand alone).

    `llm_projectors` holds the projectors of frozen encoders: they train, so they run on the
    LLM side (the first LLM stage), which lets a frozen encoder skip backward entirely; their
    cost is charged to the LLM work of the sample, per unit of that encoder.
    """

    modules: dict[str, ModuleCost]
    llm_projectors: dict[str, ModuleCost] = field(default_factory=dict)
    unit: str = "flop"
    step: dict[str, float] = field(default_factory=dict)
    """Per iteration: the optimizer step of each module group, on one device holding all of
    it (measured profiles only; the FLOPs model leaves it out)."""

    def __getitem__(self, module: str) -> ModuleCost:
        return self.modules[module]

    @property
    def coeffs(self) -> dict[str, ModuleCost]:
        return self.modules


def transformer_flops(t: TransformerSpec) -> tuple[float, float]:
    """Forward FLOPs of a stack: (per token, per token^2 of one attention span)."""
    h, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
    proj = 2 * (2 * h * h + 2 * h * kv)  # q, o: h*h; k, v: h*kv
    mlp = 2 * (3 if t.gated_mlp else 2) * h * t.intermediate_size
    head = 2 * h * t.vocab_size
    attn = 4 * h * (0.5 if t.causal else 1.0)  # QK^T and PV, half of it masked when causal
    return t.num_hidden_layers * (proj + mlp) + head, t.num_hidden_layers * attn


def _backward(fwd: CostCoeffs, trainable: bool, grad_to_input: bool) -> CostCoeffs:
    """Backward of a module from its forward: input gradients (one more pass of every GEMM,
    two of attention) when anything upstream needs them or the module trains, weight
    gradients (one more GEMM pass) when it trains."""
    gemm = (1 if (trainable or grad_to_input) else 0) + (1 if trainable else 0)
    attn = 2 if (trainable or grad_to_input) else 0
    return CostCoeffs(a=gemm * fwd.a, b=attn * fwd.b)


def _encoder_forward(enc: VisionSpec | AudioSpec) -> tuple[float, float]:
    """Forward FLOPs of the encoder stack and its input stem, per position."""
    lin, att = transformer_flops(enc.encoder)
    h = enc.encoder.hidden_size
    if isinstance(enc, VisionSpec):
        stem = 2 * enc.num_channels * enc.patch_size**2 * enc.temporal_patch_size * h
    else:
        # conv1 (n_mels -> h, kernel 3) runs at twice the output rate; conv2 (h -> h, kernel 3)
        stem = 2 * (2 * 3 * enc.n_mels * h) + 2 * 3 * h * h
    return lin + stem, att


def projector_cost(enc: VisionSpec | AudioSpec, llm_hidden: int) -> ModuleCost:
    """The MLP projector per encoder position (it merges `merge_size**2` patches or
    `downsample` audio frames into one LLM token). It always trains: it aligns modalities."""
    h = enc.encoder.hidden_size
    group = enc.merge_size**2 if isinstance(enc, VisionSpec) else enc.downsample
    fwd = CostCoeffs(
        a=2 * (h * group * enc.projector_hidden + enc.projector_hidden * llm_hidden) / group
    )
    return ModuleCost(fwd, _backward(fwd, trainable=True, grad_to_input=False))


def encoder_coeffs(enc: VisionSpec | AudioSpec, llm_hidden: int) -> ModuleCost:
    """Per-unit cost of an encoder (x = encoder positions of the unit), with its projector
    when the encoder trains; a frozen encoder's projector runs on the LLM side instead."""
    lin, att = _encoder_forward(enc)
    fwd = CostCoeffs(a=lin, b=att)
    cost = ModuleCost(fwd, _backward(fwd, trainable=not enc.frozen, grad_to_input=False))
    if enc.frozen:
        return cost
    proj = projector_cost(enc, llm_hidden)
    return ModuleCost(
        CostCoeffs(a=fwd.a + proj.forward.a, b=fwd.b),
        CostCoeffs(a=cost.backward.a + proj.backward.a, b=cost.backward.b),
    )


def analytic_cost_model(spec: ModelSpec) -> CostModel:
    """FLOPs-based costs for every module of `spec`."""
    modules = {e.name: encoder_coeffs(e, spec.llm.hidden_size) for e in spec.encoders}
    lin, att = transformer_flops(spec.llm)
    fwd = CostCoeffs(a=lin, b=att)
    modules["llm"] = ModuleCost(
        fwd, _backward(fwd, trainable=not spec.llm_frozen, grad_to_input=bool(spec.encoders))
    )
    projectors = {
        e.name: projector_cost(e, spec.llm.hidden_size) for e in spec.encoders if e.frozen
    }
    return CostModel(modules=modules, llm_projectors=projectors, unit="flop")


def transformer_params(t: TransformerSpec) -> float:
    """Parameters of a stack (embedding and LM head untied when there is a vocabulary)."""
    h, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
    per_layer = 2 * h * h + 2 * h * kv + (3 if t.gated_mlp else 2) * h * t.intermediate_size
    return t.num_hidden_layers * per_layer + 2 * t.vocab_size * h


def module_params(spec: ModelSpec) -> dict[str, float]:
    """Parameters per module as placed by the cost model (a trained encoder's projector with
    the encoder, a frozen encoder's with the LLM)."""
    out = {}
    llm = transformer_params(spec.llm)
    for e in spec.encoders:
        h = e.encoder.hidden_size
        group = e.merge_size**2 if isinstance(e, VisionSpec) else e.downsample
        proj = h * group * e.projector_hidden + e.projector_hidden * spec.llm.hidden_size
        out[e.name] = transformer_params(e.encoder) + (0 if e.frozen else proj)
        llm += proj if e.frozen else 0
    out["llm"] = llm
    return out

"""The analytic cost model: FLOPs of a unit as `a*x + b*x**2 + c0` of its x tokens.

`a` collects every GEMM (attention projections, FFN, patch embedding, projector, LM head),
`b` the attention scores and their weighted sum, per layer. Training multiplies forward FLOPs:
a trainable module does forward, input-gradient and weight-gradient GEMMs (3x); a frozen
module that must pass gradients upstream does two; a frozen encoder only the forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from entrain.models.spec import AudioSpec, ModelSpec, TransformerSpec, VisionSpec


@dataclass(frozen=True)
class CostCoeffs:
    """Cost of one unit with x tokens: a*x + b*x^2 + c0."""

    a: float
    b: float = 0.0
    c0: float = 0.0

    def __call__(self, x: np.ndarray | float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return self.a * x + self.b * x * x + self.c0 * (x > 0)


@dataclass(frozen=True)
class CostModel:
    """Per-module cost coefficients. Encoders cost per unit, the LLM per sample
    (samples are packed with per-sample attention, so each sample's score FLOPs stand alone)."""

    coeffs: dict[str, CostCoeffs]
    unit: str = "flop"

    def __getitem__(self, module: str) -> CostCoeffs:
        return self.coeffs[module]


def transformer_flops(t: TransformerSpec) -> tuple[float, float]:
    """Forward FLOPs of a stack: (per token, per token^2 of one attention span)."""
    h, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
    proj = 2 * (2 * h * h + 2 * h * kv)  # q, o: h*h; k, v: h*kv
    mlp = 2 * (3 if t.gated_mlp else 2) * h * t.intermediate_size
    head = 2 * h * t.vocab_size
    attn = 4 * h * (0.5 if t.causal else 1.0)  # QK^T and PV, half of it masked when causal
    return t.num_hidden_layers * (proj + mlp) + head, t.num_hidden_layers * attn


def _train_factors(trainable: bool, grad_to_input: bool) -> tuple[float, float]:
    """Multipliers of forward FLOPs (GEMMs, attention) for one training step."""
    backward = trainable or grad_to_input
    gemm = 1 + (1 if backward else 0) + (1 if trainable else 0)
    return gemm, (3 if backward else 1)


def encoder_coeffs(enc: VisionSpec | AudioSpec, llm_hidden: int) -> CostCoeffs:
    """Per-unit cost of an encoder and its projector, x = encoder positions of the unit."""
    lin, att = transformer_flops(enc.encoder)
    h = enc.encoder.hidden_size
    if isinstance(enc, VisionSpec):
        stem = 2 * enc.num_channels * enc.patch_size**2 * enc.temporal_patch_size * h
        m2 = enc.merge_size**2
        proj = 2 * (h * m2 * enc.projector_hidden + enc.projector_hidden * llm_hidden) / m2
    else:
        # conv1 (n_mels -> h, kernel 3) runs at twice the output rate; conv2 (h -> h, kernel 3)
        stem = 2 * (2 * 3 * enc.n_mels * h) + 2 * 3 * h * h
        ds = enc.downsample
        proj = 2 * (h * ds * enc.projector_hidden + enc.projector_hidden * llm_hidden) / ds
    gemm, attn = _train_factors(trainable=not enc.frozen, grad_to_input=False)
    # The projector always trains (it is what aligns modalities), even under a frozen encoder.
    return CostCoeffs(a=gemm * (lin + stem) + 3 * proj, b=attn * att)


def analytic_cost_model(spec: ModelSpec) -> CostModel:
    """FLOPs-based coefficients for every module of `spec`."""
    coeffs = {e.name: encoder_coeffs(e, spec.llm.hidden_size) for e in spec.encoders}
    lin, att = transformer_flops(spec.llm)
    gemm, attn = _train_factors(trainable=not spec.llm_frozen, grad_to_input=bool(spec.encoders))
    coeffs["llm"] = CostCoeffs(a=gemm * lin, b=attn * att)
    return CostModel(coeffs=coeffs, unit="flop")

"""Per-GPU memory of a plan: weights, gradients, optimizer states and activations.

Rough on purpose (the planner only needs to rule out plans that cannot fit): BF16 weights
and gradients, FP32 master weights and Adam moments sharded over data parallelism (ZeRO-1),
and about 34 bytes of activations per token, layer and hidden unit split over tensor
parallelism (Korthikanti et al., 2022, with sequence parallelism and flash attention) for
the LLM. Encoders are assumed to run with full activation recomputation, as MLLM trainers
do for ViTs on long videos: each layer keeps only its BF16 input (2 bytes per token and
hidden unit) and one layer's activations are live during its backward.
"""

from __future__ import annotations

from entrain.cost.flops import module_params
from entrain.models.spec import ModelSpec
from entrain.schedule.parallel import ParallelPlan

ACT_BYTES_PER_TOKEN_LAYER_HIDDEN = 34
RECOMPUTED_BYTES = 2  # a checkpointed layer input in BF16
STATE_BYTES = 12  # fp32 master weights + Adam m and v, sharded over DP


def _trained_bytes(params: float, shard: int, dp: int) -> float:
    return params / shard * 4 + params / shard * STATE_BYTES / dp  # bf16 weights + grads


def plan_memory(
    spec: ModelSpec,
    plan: ParallelPlan,
    max_mb_tokens: dict[str, float],
    deferred_tokens: float = 0.0,
) -> dict[str, float]:
    """Peak bytes on one GPU of each module group.

    `max_mb_tokens[module]` is the largest microbatch of that module in tokens (encoder
    positions for an encoder, LLM tokens for the LLM); `deferred_tokens` the embeddings the
    first LLM stage holds for later microbatches.
    """
    params = module_params(spec)
    P, tp = plan.llm_pp, plan.llm_tp
    in_flight = min(P, plan.microbatches)  # 1F1B: stage 0 holds P microbatches
    llm = spec.llm
    act = (
        max_mb_tokens["llm"]
        * (llm.num_hidden_layers / P)
        * ACT_BYTES_PER_TOKEN_LAYER_HIDDEN
        * llm.hidden_size
        / tp
    )
    out = {
        "llm": _trained_bytes(params["llm"], P * tp, plan.dp)
        + in_flight * act
        + deferred_tokens * llm.hidden_size * 2
    }
    for e in spec.encoders:
        etp, copies = plan.encoder_tp[e.name], plan.encoder_dp.get(e.name, 1)
        t = e.encoder
        # each copy holds a share of the microbatch (at least its largest unit: see the caller)
        per_mb = (
            max_mb_tokens[e.name]
            / copies
            * t.num_hidden_layers
            * ACT_BYTES_PER_TOKEN_LAYER_HIDDEN
            * t.hidden_size
            / etp
        )
        one_layer = per_mb / t.num_hidden_layers
        if e.frozen:  # forward only: weights, and one layer's transient activations
            out[e.name] = params[e.name] / etp * 2 + one_layer
        else:  # checkpointed inputs of every in-flight microbatch, one layer recomputed
            kept = per_mb * RECOMPUTED_BYTES / ACT_BYTES_PER_TOKEN_LAYER_HIDDEN
            trained = _trained_bytes(params[e.name], etp, plan.dp * copies)
            out[e.name] = trained + (P + 1) * kept + one_layer
    return out

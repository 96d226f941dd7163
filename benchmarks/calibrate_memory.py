"""Activation bytes per token per layer of the runtime's modules: the constants of
plan/memory.py's activation model, measured.

For each module kind (the LLM's decoder layer, Qwen2-VL's ViT block, Whisper's encoder
layer) and precision (fp32, bf16 autocast), builds stacks of one and two layers at a few
widths, runs a forward on about 300 tokens, and counts the bytes autograd saves for backward
(each storage once, weights and their bf16 copies left out); two layers less one is a
layer. A non-negative least-squares fit on (hidden, ffn, kv width) gives bytes per token per
layer; the fit's worst error is printed beside the coefficients. Not part of `make bench`:
run it when the modules change, and copy the numbers into plan/memory.py.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from entrain.models.spec import AudioSpec, ModelSpec, TransformerSpec, VisionSpec
from entrain.runtime.modules import AudioTower, LLMStage, VisionTower, build_llm

T = 300  # no width of SHAPES: a weight's shape is never an activation's
SHAPES = [(64, 128, 4, 2), (128, 256, 4, 2), (128, 512, 4, 4), (256, 512, 8, 2), (192, 768, 6, 6)]


def saved_bytes(run, module: torch.nn.Module) -> int:
    """Bytes autograd saves while `run` computes, each storage once, the module's own
    parameters left out (a linear layer saves its weight: that is no new memory)."""
    total = 0
    seen = {p.untyped_storage().data_ptr() for p in module.parameters()}
    shapes = {tuple(p.shape) for p in module.parameters()} | {
        tuple(p.t().shape) for p in module.parameters() if p.dim() == 2
    }

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if tuple(t.shape) in shapes:  # a weight, or autocast's bf16 copy of one: not activations
            return t
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total


def llm_case(h, i, heads, kv, ctx, layers=2):
    spec = ModelSpec(name="x", llm=TransformerSpec(hidden_size=h, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=i,
                     vocab_size=64))  # fmt: skip
    llm = build_llm(spec, 0)
    stage = LLMStage(llm.model, llm.lm_head, 0, 1)
    x = torch.randn(1, T, h, requires_grad=True)

    def run():
        with ctx():
            stage(x, torch.arange(T)[None]).sum()

    return saved_bytes(run, stage) / T, h // heads * kv


def vit_case(h, i, heads, kv, ctx, layers=2):
    enc = TransformerSpec(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=i, gated_mlp=False, causal=False)  # fmt: skip
    tower = VisionTower.from_spec(VisionSpec(encoder=enc, merge_size=2, temporal_patch_size=2), 64)
    rows, cols = 18, 16  # 288 patches (even sides: the 2x2 merge), no width of SHAPES
    patches = torch.randn(rows * cols, 3 * 2 * 14 * 14, requires_grad=True)

    def run():
        with ctx():
            tower.vit(patches, grid_thw=torch.tensor([[1, rows, cols]])).last_hidden_state.sum()

    return saved_bytes(run, tower) / (rows * cols), h


def whisper_case(h, i, heads, kv, ctx, layers=2):
    enc = TransformerSpec(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=i, gated_mlp=False, causal=False)  # fmt: skip
    spec = AudioSpec(encoder=enc, n_mels=16, frames_per_second=T // 10, chunk_seconds=10.0)
    tower = AudioTower.from_spec(spec, 64)
    mels = torch.randn(1, 16, 2 * T, requires_grad=True)

    def run():
        with ctx():
            tower.encoder(mels).last_hidden_state.sum()

    return saved_bytes(run, tower) / T, h


def nnls(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Least squares with non-negative coefficients: drop the most negative feature and
    refit until none is (enough for three features)."""
    keep = list(range(X.shape[1]))
    while True:
        coef = np.zeros(X.shape[1])
        coef[keep] = np.linalg.lstsq(X[:, keep], Y, rcond=None)[0]
        if (coef >= 0).all():
            return coef
        keep.remove(int(np.argmin(coef)))


def fit(case, ctx) -> tuple[np.ndarray, float]:
    X, Y = [], []
    for h, i, heads, kv in SHAPES:  # a layer's bytes: two layers' less one's (stem cancels)
        two, kvw = case(h, i, heads, kv, ctx, layers=2)
        one, _ = case(h, i, heads, kv, ctx, layers=1)
        y = two - one
        X.append([h, i, kvw] if case is llm_case else [h, i, 0])
        Y.append(y)
    X, Y = np.array(X, float), np.array(Y)
    coef = nnls(X, Y)
    return coef, float(np.max(np.abs(X @ coef - Y) / Y))


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    for prec in ("fp32", "bf16"):
        ctx = contextlib.nullcontext
        if prec == "bf16":
            ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
        for name, case in (("llm", llm_case), ("vit", vit_case), ("whisper", whisper_case)):
            coef, err = fit(case, ctx)
            print(f"{prec} {name:8s} bytes/token/layer = {coef[0]:.1f} h + {coef[1]:.1f} ffn "
                  f"+ {coef[2]:.1f} kv   (worst fit error {100 * err:.1f}%)")  # fmt: skip


def stems() -> None:
    """Bytes per encoder position outside the blocks (stem, merger or projector): a one-layer
    tower less one layer, as the runtime calls it (a trained encoder: through its projector)."""
    for prec in ("fp32", "bf16"):
        ctx = contextlib.nullcontext
        if prec == "bf16":
            ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
        for name, case in (("vit", vit_tower_case), ("whisper", whisper_tower_case)):
            rows = []
            for h, i, heads, _kv in SHAPES:
                one, two = case(h, i, heads, ctx, 1), case(h, i, heads, ctx, 2)
                rows.append((h, 2 * one - two))
            print(prec, name, "outside the blocks, bytes/position:",
                  ", ".join(f"h={h}: {b:.0f}" for h, b in rows))  # fmt: skip


def vit_tower_case(h, i, heads, ctx, layers):
    enc = TransformerSpec(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=i, gated_mlp=False, causal=False)  # fmt: skip
    tower = VisionTower.from_spec(
        VisionSpec(encoder=enc, merge_size=2, temporal_patch_size=2, projector_hidden=4 * h), 64
    )
    rows, cols = 18, 16
    patches = torch.randn(rows * cols, 3 * 2 * 14 * 14)

    def run():
        with ctx():
            tower(patches, torch.tensor([[1, rows, cols]])).sum()

    return saved_bytes(run, tower) / (rows * cols)


def whisper_tower_case(h, i, heads, ctx, layers):
    enc = TransformerSpec(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                          intermediate_size=i, gated_mlp=False, causal=False)  # fmt: skip
    spec = AudioSpec(encoder=enc, n_mels=16, frames_per_second=T // 10, chunk_seconds=10.0,
                     projector_hidden=2 * h)  # fmt: skip
    tower = AudioTower.from_spec(spec, 64)
    mels = torch.randn(1, 16, 2 * T)

    def run():
        with ctx():
            sum(x.sum() for x in tower(mels, [T]))

    return saved_bytes(run, tower) / T


if __name__ == "__main__":
    main()
    stems()

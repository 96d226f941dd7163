"""Named model specs. Each preset is a function so a caller gets a fresh, mutable copy."""

from __future__ import annotations

from collections.abc import Callable

from entrain.models.spec import AudioSpec, ModelSpec, TransformerSpec, VisionSpec


def _qwen2_7b_llm() -> TransformerSpec:
    # Qwen2-7B / Qwen2.5-7B config.json
    return TransformerSpec(
        hidden_size=3584,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        intermediate_size=18944,
        vocab_size=152064,
    )


def _qwen_vision(*, gated: bool, intermediate: int) -> VisionSpec:
    """Qwen2-VL-style ViT (32 x 1280) with native dynamic resolution: 14 px patches, 2x2
    merge, two frames per temporal patch. max_pixels is the 1280*28*28 of the model card's
    memory-bounded example, not the processor default of 16384*28*28."""
    return VisionSpec(
        encoder=_qwen2_vl_vit(gated=gated, intermediate=intermediate),
        patch_size=14,
        resize="dynamic",
        min_pixels=56 * 56,
        max_pixels=28 * 28 * 1280,
        merge_size=2,
        temporal_patch_size=2,
        projector_hidden=5120,
    )


def _qwen2_vl_vit(*, gated: bool, intermediate: int) -> TransformerSpec:
    return TransformerSpec(
        hidden_size=1280,
        num_hidden_layers=32,
        num_attention_heads=16,
        intermediate_size=intermediate,
        gated_mlp=gated,
        causal=False,
    )


def llava_1_5_7b() -> ModelSpec:
    """LLaVA-1.5-7B: CLIP ViT-L/14 at a fixed 336 px (576 tokens an image), Vicuna-7B.

    The vision tower is frozen during LLaVA-1.5 fine-tuning, so it runs forward only.
    """
    clip = TransformerSpec(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        gated_mlp=False,
        causal=False,
    )
    vicuna = TransformerSpec(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    )
    vision = VisionSpec(
        encoder=clip,
        patch_size=14,
        resize="fixed",
        image_size=336,
        cls_token=True,
        merge_size=1,
        temporal_patch_size=1,
        projector_hidden=4096,
        frozen=True,
    )
    return ModelSpec(name="llava-1.5-7b", llm=vicuna, encoders=(vision,))


def qwen2_vl_7b() -> ModelSpec:
    """Qwen2-VL-7B: native dynamic resolution (14 px patches, 2x2 merge, 3136..1003520 px)."""
    vision = _qwen_vision(gated=False, intermediate=5120)
    return ModelSpec(name="qwen2-vl-7b", llm=_qwen2_7b_llm(), encoders=(vision,))


def omni_7b() -> ModelSpec:
    """An omni model in the shape of Qwen2.5-Omni-7B: a dynamic-resolution ViT, a
    Whisper-large-v3 audio encoder (32 layers, 1280 wide) over actual clip lengths in 30 s
    chunks, pooled 2x to 25 LLM tokens a second, and a Qwen2.5-7B LLM."""
    vision = _qwen_vision(gated=True, intermediate=3420)
    whisper = TransformerSpec(
        hidden_size=1280,
        num_hidden_layers=32,
        num_attention_heads=20,
        intermediate_size=5120,
        gated_mlp=False,
        causal=False,
    )
    audio = AudioSpec(
        encoder=whisper,
        n_mels=128,
        frames_per_second=50,
        chunk_seconds=30.0,
        pad_to_chunk=False,
        downsample=2,
        projector_hidden=3584,
    )
    return ModelSpec(name="omni-7b", llm=_qwen2_7b_llm(), encoders=(vision, audio))


def _tiny_encoder() -> TransformerSpec:
    return TransformerSpec(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        gated_mlp=False,
        causal=False,
    )


def tiny() -> ModelSpec:
    """Small enough to train on a laptop CPU: images capped at 256 patches, Whisper-style
    audio padded to 10 s chunks of 250 positions (a 320-sample hop at 16 kHz)."""
    vit = _tiny_encoder()
    vision = VisionSpec(
        encoder=vit,
        patch_size=14,
        resize="dynamic",
        min_pixels=28 * 28 * 4,
        max_pixels=28 * 28 * 64,
        video_min_pixels=28 * 28 * 4,
        video_max_pixels=28 * 28 * 16,
        merge_size=2,
        temporal_patch_size=2,
        projector_hidden=128,
    )
    aud = _tiny_encoder()
    audio = AudioSpec(
        encoder=aud,
        n_mels=32,
        frames_per_second=25,
        chunk_seconds=10.0,
        pad_to_chunk=True,
        downsample=2,
        projector_hidden=128,
    )
    llm = TransformerSpec(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        vocab_size=512,
    )
    return ModelSpec(name="tiny", llm=llm, encoders=(vision, audio))


PRESETS: dict[str, Callable[[], ModelSpec]] = {
    "llava-1.5-7b": llava_1_5_7b,
    "qwen2-vl-7b": qwen2_vl_7b,
    "omni-7b": omni_7b,
    "tiny": tiny,
}

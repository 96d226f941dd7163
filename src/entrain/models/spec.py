"""Model specs: what the cost model and the runtime need to know about an MLLM, and no more.

Field names follow Hugging Face config names (`hidden_size`, `num_hidden_layers`, ...) so a
spec reads like the config.json it describes. Plain dataclasses: no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from entrain.workload.columnar import MODALITIES


def _positive(obj: object, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{type(obj).__name__}.{n} must be a positive number, got {v!r}")


@dataclass(kw_only=True)
class TransformerSpec:
    """Shape of one transformer stack (an encoder or the LLM)."""

    hidden_size: int
    """Model width."""
    num_hidden_layers: int
    """Number of transformer blocks."""
    num_attention_heads: int
    """Query heads; hidden_size must divide evenly."""
    intermediate_size: int
    """FFN width."""
    num_key_value_heads: int | None = None
    """Key/value heads for grouped-query attention; None means as many as query heads."""
    gated_mlp: bool = True
    """SwiGLU-style FFN with three matrices (LLaMA, Qwen) instead of two (ViT, Whisper)."""
    causal: bool = True
    """Causal attention does about half the score FLOPs of full attention."""
    vocab_size: int = 0
    """Vocabulary for the LM head; 0 for encoders."""

    def __post_init__(self) -> None:
        _positive(
            self, "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"
        )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _positive(self, "num_key_value_heads")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(kw_only=True)
class VisionSpec:
    """A ViT-style image (and video) encoder with its projector into the LLM."""

    name: str = "vision"
    """Module name used in metrics and reports."""
    modalities: tuple[str, ...] = ("image", "video")
    """Manifest modalities this encoder consumes."""
    encoder: TransformerSpec
    """The ViT."""
    patch_size: int = 14
    """Pixels per patch side."""
    resize: Literal["fixed", "dynamic"] = "dynamic"
    """`fixed`: every image resized to image_size (CLIP/LLaVA); `dynamic`: native resolution
    rounded to the patch grid within [min_pixels, max_pixels] (Qwen2-VL)."""
    image_size: int = 336
    """Side of the square input for `fixed`."""
    min_pixels: int = 56 * 56
    """Lower pixel bound for `dynamic` images."""
    max_pixels: int = 28 * 28 * 16384
    """Upper pixel bound for `dynamic` images."""
    video_min_pixels: int = 128 * 28 * 28
    """Per-frame lower pixel bound for video."""
    video_max_pixels: int = 768 * 28 * 28
    """Per-frame upper pixel bound for video."""
    video_total_pixels: int = 24576 * 28 * 28
    """Pixel budget of a whole video: long videos get smaller frames (qwen-vl-utils)."""
    merge_size: int = 1
    """Patches merged per side before the LLM (2 in Qwen2-VL: 4 patches -> 1 LLM token)."""
    temporal_patch_size: int = 1
    """Video frames per temporal patch; one temporal patch of a video is one indivisible unit."""
    cls_token: bool = False
    """A CLS token adds one encoder position per image (CLIP)."""
    num_channels: int = 3
    """Input channels (for the patch-embedding cost)."""
    projector_hidden: int = 4096
    """Hidden width of the MLP projector."""
    frozen: bool = False
    """A frozen encoder runs forward only; its projector still trains."""

    def __post_init__(self) -> None:
        _positive(
            self,
            "patch_size",
            "image_size",
            "min_pixels",
            "max_pixels",
            "merge_size",
            "temporal_patch_size",
            "projector_hidden",
            "video_min_pixels",
            "video_max_pixels",
            "video_total_pixels",
        )
        if self.resize not in ("fixed", "dynamic"):
            raise ValueError(f"VisionSpec.resize must be 'fixed' or 'dynamic', got {self.resize!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError("VisionSpec.min_pixels must not exceed max_pixels")
        if self.resize == "fixed" and (self.image_size // self.patch_size) % self.merge_size:
            raise ValueError("image_size / patch_size must be divisible by merge_size")
        self.modalities = tuple(self.modalities)


@dataclass(kw_only=True)
class AudioSpec:
    """A Whisper-style audio encoder: log-mel frames, conv stem, transformer, pooling."""

    name: str = "audio"
    """Module name used in metrics and reports."""
    modalities: tuple[str, ...] = ("audio",)
    """Manifest modalities this encoder consumes."""
    encoder: TransformerSpec
    """The transformer over audio frames."""
    n_mels: int = 128
    """Mel bins of the input features."""
    frames_per_second: int = 50
    """Encoder positions per second of audio (Whisper: 100 mel frames/s, conv stride 2)."""
    chunk_seconds: float = 30.0
    """Audio is encoded in independent chunks of this length; a chunk is one indivisible unit."""
    pad_to_chunk: bool = True
    """Whisper pads every chunk to full length, so a 2 s clip costs as much as 30 s."""
    downsample: int = 2
    """Encoder positions pooled per LLM token."""
    projector_hidden: int = 4096
    """Hidden width of the MLP projector."""
    frozen: bool = False
    """A frozen encoder runs forward only; its projector still trains."""

    def __post_init__(self) -> None:
        _positive(
            self, "n_mels", "frames_per_second", "chunk_seconds", "downsample", "projector_hidden"
        )
        self.modalities = tuple(self.modalities)


EncoderSpec = VisionSpec | AudioSpec


@dataclass(kw_only=True)
class ModelSpec:
    """A whole MLLM: encoders (each with its projector) feeding one decoder LLM."""

    name: str
    """Preset or user name."""
    llm: TransformerSpec
    """The decoder."""
    encoders: tuple[EncoderSpec, ...] = field(default_factory=tuple)
    """Modality encoders; each modality is consumed by at most one of them."""
    llm_frozen: bool = False
    """A frozen LLM still runs backward through activations when a projector trains."""

    def __post_init__(self) -> None:
        self.encoders = tuple(self.encoders)
        names = [e.name for e in self.encoders]
        if len(set(names)) != len(names) or "llm" in names:
            raise ValueError(f"encoder names must be unique and not 'llm', got {names}")
        seen: dict[str, str] = {}
        for e in self.encoders:
            for m in e.modalities:
                if m not in MODALITIES:
                    raise ValueError(
                        f"encoder {e.name!r}: unknown modality {m!r} (known: {MODALITIES})"
                    )
                if m in seen:
                    raise ValueError(
                        f"modality {m!r} is consumed by both {seen[m]!r} and {e.name!r}"
                    )
                seen[m] = e.name

    @property
    def modules(self) -> tuple[str, ...]:
        """Module names in pipeline order: encoders first, then the LLM."""
        return tuple(e.name for e in self.encoders) + ("llm",)

    def encoder_for(self, modality: str) -> EncoderSpec | None:
        for e in self.encoders:
            if modality in e.modalities:
                return e
        return None

"""Real Hugging Face modules built from a model spec, with random weights (no downloads).

- vision: Qwen2-VL's ViT (`Qwen2VisionTransformerPretrainedModel`): native dynamic
  resolution, per-image attention; its patch merger is the vision projector.
- audio: Whisper's encoder (`WhisperEncoder`) over padded chunks, 2x pooling, an MLP projector.
- llm: `Qwen2ForCausalLM`, cut into pipeline stages by decoder layer.

Every module is initialized from its own seed, so every rank (and the single-process
reference) builds bit-identical weights for the part it holds.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from entrain.models.spec import AudioSpec, ModelSpec, VisionSpec

MODULE_SEED = {"vision": 1, "audio": 2, "llm": 3}


def _seeded(seed: int, offset: int):
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed * 1000 + offset)
    return gen_state


class VisionTower(nn.Module):
    """Qwen2-VL ViT; `forward` returns per-unit LLM-width embeddings, `trunk` the patch states
    before the merger (what a frozen encoder sends to the LLM side)."""

    def __init__(self, spec: VisionSpec, llm_hidden: int):
        super().__init__()
        if spec.resize != "dynamic" or spec.cls_token:
            raise ValueError(
                f"the runtime builds Qwen2-VL-style vision encoders (dynamic resolution, no CLS); "
                f"{spec.name!r} is resize={spec.resize!r}"
            )
        t = spec.encoder
        if t.intermediate_size % t.hidden_size:
            raise ValueError(
                f"{spec.name}: Qwen2-VL's ViT needs intermediate_size a multiple of hidden_size"
            )
        cfg = Qwen2VLVisionConfig(
            depth=t.num_hidden_layers,
            embed_dim=t.hidden_size,
            hidden_size=llm_hidden,
            num_heads=t.num_attention_heads,
            mlp_ratio=t.intermediate_size // t.hidden_size,
            patch_size=spec.patch_size,
            spatial_merge_size=spec.merge_size,
            temporal_patch_size=spec.temporal_patch_size,
            in_channels=spec.num_channels,
        )
        cfg._attn_implementation = "sdpa"
        self.vit = Qwen2VisionTransformerPretrainedModel._from_config(cfg)

    @property
    def projector(self) -> nn.Module:
        return self.vit.merger

    def trunk(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.vit(patches, grid_thw=grid_thw).last_hidden_state  # (patches, embed)

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.vit(patches, grid_thw=grid_thw).pooler_output  # (patches / merge^2, llm)


class AudioProjector(nn.Module):
    """Pool `downsample` encoder positions into one LLM token, then an MLP to LLM width."""

    def __init__(self, hidden: int, downsample: int, proj_hidden: int, llm_hidden: int):
        super().__init__()
        self.downsample = downsample
        self.mlp = nn.Sequential(
            nn.Linear(hidden * downsample, proj_hidden),
            nn.GELU(),
            nn.Linear(proj_hidden, llm_hidden),
        )

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        # states: (positions, hidden) of one chunk's valid positions
        n, h = states.shape
        groups = math.ceil(n / self.downsample)
        pad = groups * self.downsample - n
        if pad:
            states = torch.cat([states, states.new_zeros(pad, h)])
        return self.mlp(states.reshape(groups, h * self.downsample))


class AudioTower(nn.Module):
    """Whisper encoder over fixed-length chunks; each chunk keeps its valid positions."""

    def __init__(self, spec: AudioSpec, llm_hidden: int):
        super().__init__()
        t = spec.encoder
        self.positions = int(round(spec.chunk_seconds * spec.frames_per_second))
        cfg = WhisperConfig(
            d_model=t.hidden_size,
            encoder_layers=t.num_hidden_layers,
            encoder_attention_heads=t.num_attention_heads,
            encoder_ffn_dim=t.intermediate_size,
            num_mel_bins=spec.n_mels,
            max_source_positions=self.positions,
            decoder_layers=1,
            decoder_attention_heads=t.num_attention_heads,
            decoder_ffn_dim=t.intermediate_size,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            encoder_layerdrop=0.0,
        )
        cfg._attn_implementation = "sdpa"
        self.encoder = WhisperEncoder(cfg)
        self.projector = AudioProjector(
            t.hidden_size, spec.downsample, spec.projector_hidden, llm_hidden
        )

    def trunk(self, mels: torch.Tensor, valid: list[int]) -> list[torch.Tensor]:
        states = self.encoder(mels).last_hidden_state  # (chunks, positions, hidden)
        return [states[i, :v] for i, v in enumerate(valid)]

    def forward(self, mels: torch.Tensor, valid: list[int]) -> list[torch.Tensor]:
        return [self.projector(s) for s in self.trunk(mels, valid)]


def build_encoder(spec: ModelSpec, name: str, seed: int) -> nn.Module:
    """One encoder tower with its projector, initialized from (seed, encoder)."""
    enc = next((e for e in spec.encoders if e.name == name), None)
    if enc is None:
        raise ValueError(f"model {spec.name!r} has no encoder {name!r}")
    offset = MODULE_SEED.get(name, 10 + [e.name for e in spec.encoders].index(name))
    state = _seeded(seed, offset)
    try:
        tower = (
            VisionTower(enc, spec.llm.hidden_size)
            if isinstance(enc, VisionSpec)
            else AudioTower(enc, spec.llm.hidden_size)
        )
    finally:
        torch.random.set_rng_state(state)
    if enc.frozen:
        for p in tower.parameters():
            p.requires_grad_(False)
        for p in tower.projector.parameters():  # the projector of a frozen encoder still trains
            p.requires_grad_(True)
    return tower


def build_llm(spec: ModelSpec, seed: int) -> Qwen2ForCausalLM:
    t = spec.llm
    cfg = Qwen2Config(
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        intermediate_size=t.intermediate_size,
        vocab_size=t.vocab_size,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
        attention_dropout=0.0,
    )
    cfg._attn_implementation = "sdpa"
    state = _seeded(seed, MODULE_SEED["llm"])
    try:
        model = Qwen2ForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(state)
    if spec.llm_frozen:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def stage_layers(num_layers: int, stages: int) -> list[range]:
    """Decoder layers of each pipeline stage, as even as the count allows (earlier stages
    take the remainder: the last also runs the LM head)."""
    base, extra = divmod(num_layers, stages)
    out, start = [], 0
    for s in range(stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


class LLMStage(nn.Module):
    """One pipeline stage of the LLM. Stage 0 embeds text; the last stage applies the final
    norm and LM head and returns the summed next-token loss over a sample's text."""

    def __init__(self, model: Qwen2ForCausalLM, stage: int, stages: int):
        super().__init__()
        self.first, self.last = stage == 0, stage == stages - 1
        self.config = model.config
        layers = stage_layers(model.config.num_hidden_layers, stages)[stage]
        self.layers = nn.ModuleList(model.model.layers[i] for i in layers)
        self.rotary = model.model.rotary_emb
        self.embed = model.model.embed_tokens if self.first else None
        self.norm = model.model.norm if self.last else None
        self.head = model.lm_head if self.last else None

    def embed_sample(self, prefix: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
        """(1, L, H): modality embeddings in order, then the text's token embeddings."""
        parts = [p for p in prefix] + [self.embed(text)]
        return torch.cat(parts, dim=0).unsqueeze(0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=None,
            cache=None,
            position_ids=pos,
        )
        pe = self.rotary(hidden, pos)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        return hidden

    def loss(self, hidden: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of predicting each text token from the one before it."""
        n_text = text.shape[0]
        if n_text < 2:
            return hidden.sum() * 0.0
        states = self.norm(hidden[0, -n_text:-1])
        logits = self.head(states).float()
        return nn.functional.cross_entropy(logits, text[1:], reduction="sum")

"""The runtime's modules, wrapped around real Hugging Face ones.

- vision: Qwen2-VL's (or Qwen2.5-VL's) ViT: native dynamic resolution, per-image attention;
  its patch merger is the vision projector.
- audio: Whisper's encoder over padded chunks, 2x pooling, an MLP projector.
- llm: a transformers decoder (Qwen2, or Qwen2-VL's with M-RoPE), cut into pipeline stages
  by decoder layer.

Presets build them from a spec with random weights, each module from its own seed, so every
rank (and the single-process reference) builds bit-identical weights for the part it holds.
A Hugging Face model folder gives the same wrappers the checkpoint's own modules
(runtime/hf_load.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM, WhisperConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from entrain.data.sequence import IGNORE
from entrain.models.spec import AudioSpec, ModelSpec, VisionSpec

MODULE_SEED = {"vision": 1, "audio": 2, "llm": 3}


def _seeded(seed: int, offset: int):
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed * 1000 + offset)
    return gen_state


class VisionTower(nn.Module):
    """A Qwen2-VL-style ViT; `forward` returns per-unit LLM-width embeddings, `trunk` the
    patch states before the merger (what a frozen encoder sends to the LLM side).

    `window` (Qwen2.5-VL): the ViT runs its patches reordered into attention windows, whole
    merge groups at a time, and un-permutes only the merger's output; `trunk` un-permutes the
    groups itself, so the LLM-side merger of a frozen encoder sees them in image order."""

    def __init__(self, vit: nn.Module, window: bool = False):
        super().__init__()
        self.vit, self.window = vit, window

    @classmethod
    def from_spec(cls, spec: VisionSpec, llm_hidden: int) -> VisionTower:
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
        return cls(Qwen2VisionTransformerPretrainedModel._from_config(cfg))

    @property
    def projector(self) -> nn.Module:
        return self.vit.merger

    def trunk(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        states = self.vit(patches, grid_thw=grid_thw).last_hidden_state  # (patches, embed)
        if not self.window:
            return states
        from transformers.vision_utils import get_vision_window_index

        cfg = self.vit.config
        order, _ = get_vision_window_index(
            grid_thw, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size
        )
        group = cfg.spatial_merge_size**2
        undo = torch.argsort(order.to(states.device))
        return states.view(-1, group, states.shape[-1])[undo].reshape(states.shape)

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
    """A Whisper encoder over fixed-length chunks; each chunk keeps its valid positions, then
    the projector pools and maps them to the LLM's width."""

    def __init__(self, encoder: nn.Module, projector: nn.Module, positions: int):
        super().__init__()
        self.encoder, self.projector, self.positions = encoder, projector, positions

    @classmethod
    def from_spec(cls, spec: AudioSpec, llm_hidden: int) -> AudioTower:
        t = spec.encoder
        positions = int(round(spec.chunk_seconds * spec.frames_per_second))
        cfg = WhisperConfig(
            d_model=t.hidden_size,
            encoder_layers=t.num_hidden_layers,
            encoder_attention_heads=t.num_attention_heads,
            encoder_ffn_dim=t.intermediate_size,
            num_mel_bins=spec.n_mels,
            max_source_positions=positions,
            decoder_layers=1,
            decoder_attention_heads=t.num_attention_heads,
            decoder_ffn_dim=t.intermediate_size,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            encoder_layerdrop=0.0,
        )
        cfg._attn_implementation = "sdpa"
        projector = AudioProjector(
            t.hidden_size, spec.downsample, spec.projector_hidden, llm_hidden
        )
        return cls(WhisperEncoder(cfg), projector, positions)

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
            VisionTower.from_spec(enc, spec.llm.hidden_size)
            if isinstance(enc, VisionSpec)
            else AudioTower.from_spec(enc, spec.llm.hidden_size)
        )
    finally:
        torch.random.set_rng_state(state)
    freeze(tower, enc.frozen)
    return tower


def freeze(tower: nn.Module, frozen: bool) -> None:
    """A frozen encoder runs forward only; its projector still trains."""
    if frozen:
        for p in tower.parameters():
            p.requires_grad_(False)
        for p in tower.projector.parameters():
            p.requires_grad_(True)


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


def enable_recompute(module: nn.Module) -> int:
    """Recompute each transformer block's activations in backward (keeping only its input):
    every transformers block under `module` checkpoints itself, non-reentrant (so it
    recomputes under the autocast state of its forward). Returns the blocks switched."""
    import functools

    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]
    for m in blocks:
        m.gradient_checkpointing = True
        m._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)
    module.train()  # transformers checkpoints only in training mode
    return len(blocks)


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
    """One pipeline stage of a decoder LLM, built from a transformers text model (its
    `embed_tokens`, `layers`, `norm`, `rotary_emb`) and LM head. Stage 0 embeds a sample's
    tokens and puts its items' embeddings where their placeholders stand; the last stage
    applies the final norm and the head and returns the summed next-token loss."""

    def __init__(self, text_model: nn.Module, head: nn.Module, stage: int, stages: int):
        super().__init__()
        self.first, self.last = stage == 0, stage == stages - 1
        self.config = text_model.config
        layers = stage_layers(self.config.num_hidden_layers, stages)[stage]
        self.layers = nn.ModuleList(text_model.layers[i] for i in layers)
        types = getattr(self.config, "layer_types", None) or ["full_attention"] * len(
            text_model.layers
        )
        self.layer_types = [types[i] for i in layers]
        self.rotary = text_model.rotary_emb
        self.embed = text_model.embed_tokens if self.first else None
        self.norm = text_model.norm if self.last else None
        self.head = head if self.last else None

    def embed_sample(
        self, ids: torch.Tensor, spans: Sequence, items: Sequence[list[torch.Tensor]]
    ) -> torch.Tensor:
        """(1, L, H): the token embeddings of `ids` (L,), with the rows of each span replaced
        by its item's embeddings (`items[k]`: the item's units, in order)."""
        tokens = self.embed(ids)  # (L, H)
        parts, row = [], 0
        for span, units in zip(spans, items):
            parts.append(tokens[row : span.start])
            parts.extend(u.to(tokens.dtype) for u in units)  # bf16 messages join fp32 rows
            row = span.start + span.rows
            got = sum(int(u.shape[0]) for u in units)
            if got != span.rows:
                raise RuntimeError(
                    f"a {span.modality} item takes {span.rows} rows of its sample but its "
                    f"encoder produced {got}"
                )
        parts.append(tokens[row:])
        return torch.cat(parts, dim=0).unsqueeze(0)

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`positions`: (1, L), or (3, L) for M-RoPE."""
        pos = positions.to(hidden.device).unsqueeze(-2)  # (k, 1, L)
        if pos.shape[0] == 1:
            pos = pos[0]  # (1, L): 1-D rotary takes (batch, L)
        masks = {}
        for kind in set(self.layer_types):
            make = (
                create_causal_mask
                if kind == "full_attention"
                else create_sliding_window_causal_mask
            )
            masks[kind] = make(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=None,
                cache=None,
                position_ids=None,
            )
        pe = self.rotary(hidden, pos)
        for layer, kind in zip(self.layers, self.layer_types):
            hidden = layer(hidden, attention_mask=masks[kind], position_embeddings=pe)
        return hidden

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed cross-entropy of each position's prediction of the next label, over the
        labels that are not IGNORE (the head runs on those positions only)."""
        keep = (labels[1:] != IGNORE).nonzero().squeeze(1)
        if keep.numel() == 0:
            return hidden.sum() * 0.0
        states = self.norm(hidden[0, keep])
        logits = self.head(states).float()
        return nn.functional.cross_entropy(logits, labels[1:][keep], reduction="sum")

"""Tiny real Hugging Face models for tests, made here (no downloads): a byte-level BPE
tokenizer with Qwen2-VL's special tokens, and Qwen2-VL / Qwen2.5-VL / Whisper models built
with transformers' own classes and saved with `save_pretrained`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "a photo of a cat on a mat",
    "the dog runs in the park and the cat sleeps",
    "describe the image in detail please",
    "there is a red square and a blue circle",
    "what do you hear in this clip",
    "a tone at four hundred hertz then silence",
    "this shows a picture, then a sound and more",
]
SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


# A chat template in the manner of Qwen2-VL's (ChatML turns, a default system turn, images
# and videos as vision-start / pad / vision-end), written here for the tests.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(folder: Path) -> dict[str, int]:
    """A byte-level BPE tokenizer trained on CORPUS with Qwen2-VL's special tokens, saved to
    `folder`; returns the special tokens' ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[]
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return {t: tok.token_to_id(t) for t in SPECIAL}


def tiny_vl(
    folder: Path,
    kind: str = "qwen2_vl",
    tie: bool = False,
    layers: int = 2,
    hidden: int = 64,
    seed: int = 0,
    shards: bool = False,
) -> Path:
    """A tiny Qwen2-VL (or Qwen2.5-VL) with its tokenizer and image processor config."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    folder.mkdir(parents=True, exist_ok=True)
    ids = make_tokenizer(folder)
    vocab = max(ids.values()) + 8
    text = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=2 * hidden,
        vocab_size=vocab,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=tie,
    )
    common = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie,
    )
    if kind == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=4, mlp_ratio=2)
        cfg, cls = (
            Qwen2VLConfig(text_config=text, vision_config=vision, **common),
            Qwen2VLForConditionalGeneration,
        )
    else:
        vision = dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=hidden,
            num_heads=4,
            intermediate_size=64,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
        cls = Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():  # norms away from 1 and nonzero biases: a wrong load shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder, max_shard_size="200KB" if shards else "5GB")
    (folder / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "min_pixels": 28 * 28 * 4,
                "max_pixels": 28 * 28 * 64,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
            }
        )
    )
    return folder


def tiny_whisper(folder: Path, seed: int = 0) -> Path:
    """A tiny Whisper (encoder 2 x 32, 16 mel bins, 30 s chunks at 50 positions a second)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        num_mel_bins=16,
        max_source_positions=1500,
        vocab_size=100,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    torch.manual_seed(seed)
    WhisperForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


def transformers_loss(model_cls, folder: Path, cfg) -> float:
    """The transformers model's own loss on step 0's global batch, normalized as Entrain does
    (summed over the batch's label tokens)."""
    import dataclasses

    from entrain.runtime.inputs import image_patches
    from entrain.runtime.reference import loss_tokens
    from entrain.runtime.setup import make_step, open_dataset, source_of

    model = model_cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    source = source_of(cfg)
    data = open_dataset(cfg, source)
    one = dataclasses.replace(cfg, policy="sequential", lookahead=None, microbatches=1, dp=1)
    st = make_step(data, one, 0, 1)
    vision = source.spec.encoders[0]
    pad = data.codec.pad_ids["image"]
    total = 0.0
    with torch.no_grad():
        for i in map(int, st.indices):
            tok = data.tokens(i)
            ids = torch.from_numpy(tok.input_ids)[None]
            extra = {}
            if data.records[i].images:
                rec = data.records[i]
                parts = [image_patches(path, vision, rec.id) for path in rec.images]
                extra = dict(
                    pixel_values=torch.cat([p for p, _ in parts]),
                    image_grid_thw=torch.cat([g for _, g in parts]),
                )
            out = model(
                input_ids=ids,
                labels=torch.from_numpy(tok.labels)[None],
                mm_token_type_ids=(ids == pad).int(),
                **extra,
            )
            total += float(out.loss) * tok.targets
    return total / loss_tokens(data, st.indices)

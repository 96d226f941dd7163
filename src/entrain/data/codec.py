"""Text codecs: a tokenizer plus the model's convention for where an image, a video or an
audio clip stands in the text. No torch.

A codec knows, per modality, the *marker*: the text that stands for one item before it is
expanded (Qwen2-VL: `<|vision_start|><|image_pad|><|vision_end|>`), and the *pad id*: the
token the processor repeats once per LLM token of the item. Expanding pads after
tokenizing the whole rendered text is what Hugging Face processors do, so the ids come out
the same token for token.

Two codecs:
- `ByteTokenizer`: UTF-8 bytes folded into a small vocabulary, built locally; the tiny
  preset and the demo use it (no tokenizer files to ship).
- `HFCodec`: a model folder's own tokenizer (tokenizer.json, loaded with transformers from
  local files) and the placeholder ids of its config.json.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol

MODALITIES_IN_TEXT = ("image", "video", "audio")
USER_MARKERS = {"image": "<image>", "video": "<video>", "audio": "<audio>"}
"""What a manifest's text may hold where an item stands (the LLaVA / ShareGPT convention)."""


class TextCodec(Protocol):
    name: str
    markers: dict[str, str]
    """Modality -> the text that stands for one item before its pads are expanded."""
    pad_ids: dict[str, int]
    """Modality -> the token id repeated once per LLM token of an item."""

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text (markers included), no special tokens added."""
        ...


# ids below SPECIAL are never produced by bytes: 0 pad, 1 bos, 2 eos, 3 reserved, then one
# pad id per modality
_BYTE_PADS = {"image": 4, "video": 5, "audio": 6}
SPECIAL = 8


class ByteTokenizer:
    """One token per UTF-8 byte, shifted past a few special ids and folded into the
    vocabulary. Its markers are bare pad tokens: an item is its embedding rows, no more."""

    name = "bytes"

    def __init__(self, vocab_size: int):
        if vocab_size <= SPECIAL:
            raise ValueError(f"vocab_size must exceed {SPECIAL}")
        self.vocab_size = vocab_size
        self.markers = {m: f"<|{m}_pad|>" for m in MODALITIES_IN_TEXT}
        self.pad_ids = dict(_BYTE_PADS)
        self._split = re.compile("(" + "|".join(re.escape(v) for v in self.markers.values()) + ")")
        self._special = {self.markers[m]: i for m, i in self.pad_ids.items()}

    def encode(self, text: str) -> list[int]:
        span = self.vocab_size - SPECIAL
        out: list[int] = []
        for piece in self._split.split(text):
            if piece in self._special:
                out.append(self._special[piece])
            else:
                out.extend(SPECIAL + (b % span) for b in piece.encode("utf-8"))
        return out


class CodecError(ValueError):
    """A tokenizer folder that cannot stand in for the model; names the folder and why."""


class HFCodec:
    """A Hugging Face tokenizer with the vision-language model's placeholders."""

    def __init__(self, folder: str | os.PathLike, model=None):
        """`model` is the folder's `HFModel` (models/hf.py): it gives the placeholder ids."""
        self.folder = Path(folder)
        self.name = f"hf:{self.folder}"
        self.tok = load_tokenizer(self.folder)
        self.markers: dict[str, str] = {}
        self.pad_ids: dict[str, int] = {}
        if model is None:
            return
        start, end = model.vision_start_token_id, model.vision_end_token_id
        for modality, pad in (("image", model.image_token_id), ("video", model.video_token_id)):
            if pad is None:
                continue
            self.markers[modality] = "".join(
                self._token(i, modality) for i in (start, pad, end) if i is not None
            )
            self.pad_ids[modality] = pad
        audio = self._audio_marker(model)
        if audio:
            self.markers["audio"], self.pad_ids["audio"] = audio

    def _token(self, token_id: int, modality: str) -> str:
        text = self.tok.convert_ids_to_tokens(int(token_id))
        if text is None or self.tok.convert_tokens_to_ids(text) != token_id:
            raise CodecError(
                f"{self.folder}: the tokenizer has no token for id {token_id}, which the model's "
                f"config.json uses to mark {modality} (is this the model's own tokenizer?)"
            )
        return text

    def _audio_marker(self, model) -> tuple[str, int] | None:
        """Audio has no placeholder in a vision-language vocabulary. Qwen-style vocabularies
        carry `<|AUDIO|>` (Qwen2-Audio, Qwen2.5-Omni) or an unused `<|vision_pad|>`; the pad
        rows are replaced by audio embeddings, so only its being one special token matters."""
        vocab = self.tok.get_vocab()
        for bos, pad, eos in (("<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"),):
            if pad in vocab:
                marker = "".join(t for t in (bos, pad, eos) if t in vocab)
                return marker, vocab[pad]
        if "<|vision_pad|>" in vocab:
            return "<|vision_pad|>", vocab["<|vision_pad|>"]
        return None

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])


def load_tokenizer(folder: str | os.PathLike):
    """A tokenizer from local files only (no hub), with one clear error when it cannot be."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CodecError(
            f"tokenizer folder '{folder}' not found (give a local folder with the model's "
            "tokenizer files)"
        )
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise CodecError(
            f"{folder}: no tokenizer.json or tokenizer_config.json (pass --tokenizer DIR with "
            "the model's tokenizer files)"
        )
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise CodecError(
            "a tokenizer folder needs transformers: pip install entrain[train]"
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CodecError(f"cannot load a tokenizer from {folder}: {e}") from None
    tok.model_max_length = 2**62  # ids for training: length limits are the runtime's to check
    return tok

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
    special_ids: set[int]
    """Ids of special tokens (an assistant turn's label ends at the first one)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered text (markers included), no special tokens added."""
        ...

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids and the character where each token's text starts."""
        ...

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """A conversation (content as parts) as text, under the model's chat template."""
        ...


# ids below SPECIAL are never produced by bytes: 0 pad, 1 bos, 2 eos (the end of a chat
# turn), 3 reserved, then one pad id per modality
_BYTE_PADS = {"image": 4, "video": 5, "audio": 6}
_BYTE_EOT = ("<|eot|>", 2)
SPECIAL = 8


class ByteTokenizer:
    """One token per UTF-8 byte, shifted past a few special ids and folded into the
    vocabulary. Its markers are bare pad tokens: an item is its embedding rows, no more.
    Its chat format is "role: content<|eot|>" a turn, one line each."""

    name = "bytes"

    def __init__(self, vocab_size: int):
        if vocab_size <= SPECIAL:
            raise ValueError(f"vocab_size must exceed {SPECIAL}")
        self.vocab_size = vocab_size
        self.markers = {m: f"<|{m}_pad|>" for m in MODALITIES_IN_TEXT}
        self.pad_ids = dict(_BYTE_PADS)
        self._special = {self.markers[m]: i for m, i in self.pad_ids.items()}
        self._special[_BYTE_EOT[0]] = _BYTE_EOT[1]
        self.special_ids = set(self._special.values())
        self._split = re.compile("(" + "|".join(re.escape(v) for v in self._special) + ")")

    def encode(self, text: str) -> list[int]:
        return self.encode_with_offsets(text)[0]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        span = self.vocab_size - SPECIAL
        ids: list[int] = []
        starts: list[int] = []
        at = 0
        for piece in self._split.split(text):
            if piece in self._special:
                ids.append(self._special[piece])
                starts.append(at)
            else:
                for k, ch in enumerate(piece):
                    for b in ch.encode("utf-8"):
                        ids.append(SPECIAL + (b % span))
                        starts.append(at + k)
            at += len(piece)
        return ids, starts

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        out = []
        for m in messages:
            body = "".join(
                p["text"] if p["type"] == "text" else self.markers[p["type"]] for p in m["content"]
            )
            out.append(f"{m['role']}: {body}{_BYTE_EOT[0]}\n")
        if add_generation_prompt:
            out.append("assistant: ")
        return "".join(out)


class CodecError(ValueError):
    """A tokenizer folder that cannot stand in for the model; names the folder and why."""


class HFCodec:
    """A Hugging Face tokenizer with the vision-language model's placeholders."""

    def __init__(self, folder: str | os.PathLike, model=None):
        """`model` is the folder's `HFModel` (models/hf.py): it gives the placeholder ids."""
        self.folder = Path(folder)
        self.name = f"hf:{self.folder}"
        self.tok = load_tokenizer(self.folder)
        self.special_ids = set(self.tok.all_special_ids) | {
            i for i, t in self.tok.added_tokens_decoder.items() if t.special
        }
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

        self.special_ids = set(self.tok.all_special_ids) | {
            i for i, t in self.tok.added_tokens_decoder.items() if t.special
        }

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [a for a, _ in enc["offset_mapping"]]

    @property
    def template_file(self) -> Path:
        """Where the chat template is read from (what an error about it names)."""
        jinja = self.folder / "chat_template.jinja"
        return jinja if jinja.is_file() else self.folder / "tokenizer_config.json"

    def render_chat(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not self.tok.chat_template:
            raise CodecError(
                f"{self.folder}: the tokenizer has no chat template (tokenizer_config.json or "
                "chat_template.jinja); conversations need one"
            )
        if not messages:
            return "" if not add_generation_prompt else self._generation_prompt()
        return self.tok.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _generation_prompt(self) -> str:
        """What the template adds for an assistant turn at the very start."""
        probe = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
        with_prompt = self.tok.apply_chat_template(
            probe, tokenize=False, add_generation_prompt=True
        )
        without = self.tok.apply_chat_template(probe, tokenize=False)
        return with_prompt[len(without) :]


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

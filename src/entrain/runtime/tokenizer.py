"""A byte-level tokenizer built locally: no download, and the same on every machine.

Token ids are the UTF-8 bytes shifted past a few special ids, folded into the vocabulary.
Real training would bring its own tokenizer; the runtime only needs ids whose count the
manifest states (`text_tokens`)."""

from __future__ import annotations

SPECIAL = 4  # 0 pad, 1 bos, 2 eos, 3 reserved


class ByteTokenizer:
    def __init__(self, vocab_size: int):
        if vocab_size <= SPECIAL:
            raise ValueError(f"vocab_size must exceed {SPECIAL}")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        span = self.vocab_size - SPECIAL
        return [SPECIAL + (b % span) for b in text.encode("utf-8")]

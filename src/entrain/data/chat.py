"""Conversations as supervised fine-tuning data: parsed from the Hugging Face chat format or
LLaVA/ShareGPT turns, rendered with the tokenizer's chat template, labelled on the
assistant turns only. No torch.

Rendering follows the model's processor: image and video parts are passed to the template
as typed parts (Qwen2-VL's template writes `<|vision_start|><|image_pad|><|vision_end|>`
for each), audio parts as the codec's audio marker (vision-language templates know no
audio); the rendered text is tokenized once and each pad is expanded to its item's rows.

Labels: the tokens of each assistant turn's content and its end-of-turn token (the first
special token after the content, e.g. `<|im_end|>`); everything else, the template's role
headers and what follows the end-of-turn token included, is IGNORE. An assistant turn is
found by rendering the conversation up to it with the generation prompt (where its content
starts) and up to its end (where it ends), as LLaMA-Factory and TRL do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from entrain.data.codec import MODALITIES_IN_TEXT, USER_MARKERS, TextCodec
from entrain.data.sequence import IGNORE, Item, SampleTokens, expand

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}
"""ShareGPT's `from` values and chat roles, mapped to the roles chat templates take."""
_MARKER = re.compile("(" + "|".join(re.escape(m) for m in USER_MARKERS.values()) + ")")
_BY_MARKER = {v: k for k, v in USER_MARKERS.items()}


class ChatError(ValueError):
    """A conversation that cannot be rendered or trained on; the caller adds file and line."""


def parse_messages(rec: dict) -> list[dict] | None:
    """The record's conversation in the chat format (`"messages"`, or LLaVA/ShareGPT
    `"conversations"` with `<image>` markers in the text), or None when it has none.
    Content is a list of parts: {"type": "text", "text": ...} or {"type": "image" |
    "video" | "audio"}."""
    if "messages" in rec:
        return [_message(m, f"messages[{i}]") for i, m in enumerate(_list(rec["messages"]))]
    if "conversations" in rec:
        out = []
        for i, turn in enumerate(_list(rec["conversations"], "conversations")):
            where = f"conversations[{i}]"
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise ChatError(f'{where}: expected {{"from": ..., "value": "text"}}')
            role = ROLES.get(str(turn.get("from", "")).lower())
            if role is None:
                raise ChatError(f"{where}.from: {turn.get('from')!r} is not one of {sorted(ROLES)}")
            out.append({"role": role, "content": _parts(turn["value"])})
        return out
    return None


def _list(value, field: str = "messages") -> list:
    if not isinstance(value, list) or not value:
        raise ChatError(f"{field}: expected a non-empty list of turns")
    return value


def _parts(text: str) -> list[dict]:
    """A string with `<image>`-style markers as content parts, in order."""
    parts: list[dict] = []
    for piece in _MARKER.split(text):
        if piece in _BY_MARKER:
            parts.append({"type": _BY_MARKER[piece]})
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _message(m, where: str) -> dict:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise ChatError(f'{where}: expected {{"role": ..., "content": ...}}')
    role = ROLES.get(str(m["role"]).lower())
    if role is None:
        raise ChatError(f"{where}.role: {m['role']!r} is not one of {sorted(set(ROLES.values()))}")
    content = m["content"]
    if isinstance(content, str):
        return {"role": role, "content": _parts(content)}
    if not isinstance(content, list):
        raise ChatError(f"{where}.content: expected a string or a list of parts")
    parts = []
    for k, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.extend(_parts(part["text"]))
        elif kind in MODALITIES_IN_TEXT:
            parts.append({"type": kind})
        else:
            raise ChatError(
                f"{where}.content[{k}]: expected a part of type text (with its text), image, "
                "video or audio"
            )
    return {"role": role, "content": parts}


def media_counts(messages: Sequence[dict]) -> dict[str, int]:
    """Items each modality's parts stand for, over the whole conversation."""
    counts = dict.fromkeys(MODALITIES_IN_TEXT, 0)
    for m in messages:
        for part in m["content"]:
            if part["type"] in counts:
                counts[part["type"]] += 1
    return counts


def conversation_text(messages: Sequence[dict]) -> str:
    """The turns' text joined, for a quick estimate of the tokens (no template)."""
    return "\n".join("".join(p.get("text", "") for p in m["content"]) for m in messages)


def _for_template(messages: Sequence[dict], codec: TextCodec) -> list[dict]:
    """Messages as the template takes them: audio as the codec's marker in the text."""
    out = []
    for m in messages:
        parts = []
        for p in m["content"]:
            if p["type"] == "audio":
                parts.append({"type": "text", "text": codec.markers.get("audio", "")})
            else:
                parts.append(p)
        out.append({"role": m["role"], "content": parts})
    return out


def render(messages: Sequence[dict], codec: TextCodec) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text under the codec's chat template, and the character span of
    every assistant turn (its content and what the template closes it with)."""
    msgs = _for_template(messages, codec)
    text = codec.render_chat(msgs, add_generation_prompt=False)
    spans = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = codec.render_chat(msgs[:k], add_generation_prompt=True)
        end = codec.render_chat(msgs[: k + 1], add_generation_prompt=False)
        if not (end.startswith(start) and text.startswith(end)):
            where = getattr(codec, "template_file", codec.name)
            raise ChatError(
                f"the chat template in {where} does not render a conversation's turns as "
                "prefixes of the whole, so its assistant turns cannot be found"
            )
        spans.append((len(start), len(end)))
    return text, spans


def chat_tokens(
    sample: str,
    messages: Sequence[dict],
    items: dict[str, Sequence[Item]],
    codec: TextCodec,
    rope: str = "1d",
) -> SampleTokens:
    """Ids, assistant-only labels and positions of a conversation."""
    text, spans = render(messages, codec)
    if not spans:
        raise ChatError(f"sample {sample!r}: the conversation has no assistant turn to learn")
    ids, starts = codec.encode_with_offsets(text)
    counts = media_counts(messages)
    for m, n in counts.items():
        pad = codec.pad_ids.get(m)
        have = sum(1 for i in ids if i == pad) if pad is not None else 0
        if have != n:
            where = getattr(codec, "template_file", codec.name)
            raise ChatError(
                f"sample {sample!r}: the chat template in {where} renders {have} {m} "
                f"placeholder(s) for the conversation's {n} {m} item(s)"
            )
    labels = _assistant_labels(ids, starts, spans, codec.special_ids)
    return expand(sample, ids, labels, items, codec, rope)


def _assistant_labels(
    ids: list[int], starts: list[int], spans: list[tuple[int, int]], special: set[int]
) -> list[int]:
    """Each token whose text starts inside an assistant span, up to and including the first
    special token after some content (the end of the turn); IGNORE elsewhere."""
    labels = [IGNORE] * len(ids)
    k = 0
    for a, b in spans:
        while k < len(ids) and starts[k] < a:
            k += 1
        while k < len(ids) and starts[k] < b:
            labels[k] = ids[k]
            k += 1
            if ids[k - 1] in special:
                break
    return labels


def count_chat_tokens(sample: str, messages: Sequence[dict], codec: TextCodec) -> int:
    """The manifest's `text_tokens` of a conversation: its rendered tokens that are not an
    item's rows."""
    text, _ = render(messages, codec)
    pads = set(codec.pad_ids.values())
    return sum(1 for i in codec.encode(text) if i not in pads)


def tokens_of(
    sample: str,
    text: str | None,
    messages: Sequence[dict] | None,
    items: dict[str, Sequence[Item]],
    codec: TextCodec,
    rope: str = "1d",
) -> SampleTokens:
    """A sample's tokens: a conversation (assistant-only labels) or plain text (every token
    a label, items where `<image>`-style markers stand or in front)."""
    if messages is not None:
        return chat_tokens(sample, messages, items, codec, rope)
    from entrain.data.sequence import build_tokens

    return build_tokens(sample, text or "", items, codec, rope)


def text_tokens_of(
    sample: str, text: str | None, messages: Sequence[dict] | None, counts: dict[str, int],
    codec: TextCodec,
) -> int:  # fmt: skip
    """The manifest's `text_tokens` of a sample, as `tokens_of` will count them."""
    if messages is not None:
        return count_chat_tokens(sample, messages, codec)
    from entrain.data.sequence import count_text_tokens

    return count_text_tokens(sample, text or "", counts, codec)

"""Conversations as SFT data: ids and labels equal what Qwen2-VL's processor and chat
template give with assistant-only masking, token for token; manifests count exactly what
the runtime trains; bad conversations and templates are named in one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from hf_models import tiny_vl
from PIL import Image

from entrain.data.chat import ChatError, chat_tokens, parse_messages
from entrain.data.codec import HFCodec
from entrain.data.sequence import IGNORE
from entrain.models.hf import hf_model
from entrain.runtime.inputs import SampleError, load_records, manifest_line, to_json_line
from entrain.runtime.setup import TrainConfig, open_dataset, source_of

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def vl(tmp_path_factory) -> Path:
    return tiny_vl(tmp_path_factory.mktemp("vl") / "Qwen2-VL-tiny")


def _image(path: Path, h: int, w: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


CONVERSATIONS = {
    "multi-turn": [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "a red square and a blue circle"}],
        },
        {"role": "user", "content": [{"type": "text", "text": "and this one?"}, {"type": "image"}]},
        {"role": "assistant", "content": "the dog runs in the park"},
    ],
    "text-only": [
        {"role": "system", "content": "you describe things"},
        {"role": "user", "content": "what do you hear in this clip"},
        {"role": "assistant", "content": "a tone at four hundred hertz then silence"},
    ],
    "image-only": [
        {"role": "user", "content": [{"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a cat on a mat"}]},
    ],
}
SIZES = {"multi-turn": [(60, 90), (120, 40)], "text-only": [], "image-only": [(200, 150)]}


def _manifest(root: Path, vl: Path) -> Path:
    """A training manifest of CONVERSATIONS with their images, counted by Entrain."""
    from entrain.runtime.inputs import Record

    codec = HFCodec(vl, hf_model(vl))
    lines = []
    for k, (sid, messages) in enumerate(CONVERSATIONS.items()):
        images = [
            _image(root / f"{sid}-{i}.png", h, w, 10 * k + i) for i, (h, w) in enumerate(SIZES[sid])
        ]
        rec = Record(sid, k + 1, None, images, [], messages=parse_messages({"messages": messages}))
        entry = manifest_line(rec, codec)
        entry["files"] = {"image": [p.name for p in images]}
        lines.append(to_json_line(entry))
    path = root / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _reference(vl: Path, messages: list[dict], images: list[Path]) -> tuple[list[int], list[int]]:
    """What Qwen2VLProcessor does with the template's text (without torchvision, which its
    video half needs): each <|image_pad|> becomes grid/merge^2 pads, then the tokenizer;
    labels: the tokens after each `<|im_start|>assistant\\n` through its `<|im_end|>`."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = AutoTokenizer.from_pretrained(vl)
    pre = json.loads((vl / "preprocessor_config.json").read_text())
    proc = Qwen2VLImageProcessorPil(**{k: v for k, v in pre.items() if k != "image_processor_type"})
    text = tok.apply_chat_template(messages, tokenize=False)
    for path in images:
        n = int(proc(images=Image.open(path), return_tensors="pt")["image_grid_thw"].prod()) // 4
        text = text.replace("<|image_pad|>", "<|placeholder|>" * n, 1)
    ids = tok(text.replace("<|placeholder|>", "<|image_pad|>"))["input_ids"]
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    header = tok("assistant\n", add_special_tokens=False)["input_ids"]
    labels, inside = [IGNORE] * len(ids), False
    for i, t in enumerate(ids):
        if t == start and ids[i + 1 : i + 1 + len(header)] == header:
            inside, first = True, i + 1 + len(header)
        if inside and i >= first:
            labels[i] = t
            if t == end:
                inside = False
    return ids, labels


def test_ids_and_labels_equal_the_processor_and_template(vl, tmp_path):
    manifest = _manifest(tmp_path, vl)
    cfg = TrainConfig(data=str(manifest), model=str(vl), global_batch=3, microbatches=1)
    data = open_dataset(cfg, source_of(cfg))
    for i, rec in enumerate(data.records):
        ids, labels = _reference(vl, CONVERSATIONS[rec.id], rec.images)
        tokens = data.tokens(i)
        assert tokens.input_ids.tolist() == ids, rec.id
        assert tokens.labels.tolist() == labels, rec.id
        assert any(x != IGNORE for x in labels)


def test_manifest_counts_what_training_trains(vl, tmp_path):
    """`entrain manifest llava` with the model folder as tokenizer writes conversations
    whose text_tokens the runtime accepts (it checks every sample)."""
    from entrain.data.readers import ReaderOptions, convert

    _image(tmp_path / "a.png", 64, 48, 1)
    _image(tmp_path / "b.png", 30, 200, 2)
    src = tmp_path / "llava.json"
    src.write_text(json.dumps([
        {"id": "x", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\ndescribe the image"},
            {"from": "gpt", "value": "a red square"},
            {"from": "human", "value": "more?"}, {"from": "gpt", "value": "a blue circle"}]},
        {"id": "y", "image": ["a.png", "b.png"], "conversations": [  # no markers: in front
            {"from": "human", "value": "what is in the picture"},
            {"from": "gpt", "value": "two pictures"}]},
        {"id": "z", "conversations": [
            {"from": "human", "value": "hi"}, {"from": "gpt", "value": "the cat sleeps"}]},
    ]))  # fmt: skip
    out = tmp_path / "m.jsonl"
    convert("llava", src, out, ReaderOptions(tokenizer=str(vl)))
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert recs[1]["messages"][0]["content"][:2] == [{"type": "image"}, {"type": "image"}]
    cfg = TrainConfig(data=str(out), model=str(vl), global_batch=3, microbatches=1)
    data = open_dataset(cfg, source_of(cfg))  # raises if any text_tokens differed
    assert [data.tokens(i).text_tokens for i in range(3)] == [r["text_tokens"] for r in recs]


def test_a_conversation_without_an_assistant_turn_is_named(vl, tmp_path):
    manifest = _manifest(tmp_path, vl)
    lines = manifest.read_text().splitlines()
    rec = json.loads(lines[1])
    rec["messages"] = rec["messages"][:2]  # system and user: nothing to learn
    lines[1] = json.dumps(rec)
    manifest.write_text("\n".join(lines) + "\n")
    cfg = TrainConfig(data=str(manifest), model=str(vl), global_batch=2, microbatches=1)
    with pytest.raises(
        SampleError, match=r"manifest.jsonl:2: sample 'text-only': .*no assistant turn"
    ):
        open_dataset(cfg, source_of(cfg))

    from entrain.runtime.validate import validate_samples
    from entrain.workload.manifest import read_manifest

    bad = validate_samples(
        load_records(manifest), read_manifest(manifest), source_of(cfg).spec,
        codec=HFCodec(vl, hf_model(vl)),
    )  # fmt: skip
    assert [(b.id, b.line) for b in bad] == [("text-only", 2)]  # what --skip-bad leaves out
    assert "no assistant turn" in bad[0].reason


def test_a_template_without_the_image_placeholder_is_named(vl, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(vl, folder)
    cfg_path = folder / "tokenizer_config.json"
    jinja = folder / "chat_template.jinja"
    template = (
        jinja.read_text() if jinja.exists() else json.loads(cfg_path.read_text())["chat_template"]
    )
    text_only = re.sub(r"\{% if part\['type'\] == 'image' %\}.*?\{% elif", "{% if", template)
    assert text_only != template
    if jinja.exists():
        jinja.write_text(text_only)
    else:
        cfg = json.loads(cfg_path.read_text())
        cfg["chat_template"] = text_only
        cfg_path.write_text(json.dumps(cfg))
    codec = HFCodec(folder, hf_model(folder))
    messages = parse_messages({"messages": CONVERSATIONS["image-only"]})
    from entrain.data.sequence import Item

    with pytest.raises(ChatError) as e:
        chat_tokens("image-only", messages, {"image": [Item(4, (1, 2, 2))]}, codec)
    msg = str(e.value)
    assert "sample 'image-only'" in msg and str(codec.template_file) in msg
    assert "renders 0 image placeholder(s) for the conversation's 1 image item(s)" in msg


def test_sharegpt_turns_and_bad_messages(tmp_path):
    msgs = parse_messages(
        {
            "conversations": [
                {"from": "human", "value": "a <image> b"},
                {"from": "gpt", "value": "c"},
            ]
        }
    )
    assert msgs[0]["content"] == [
        {"type": "text", "text": "a "}, {"type": "image"}, {"type": "text", "text": " b"}
    ]  # fmt: skip
    with pytest.raises(ChatError, match=r"messages\[0\]\.role: 'narrator'"):
        parse_messages({"messages": [{"role": "narrator", "content": "x"}]})
    with pytest.raises(ChatError, match=r"conversations\[1\]: expected"):
        parse_messages({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt"}]})
    with pytest.raises(ChatError, match=r"messages\[0\]\.content\[0\]: expected a part"):
        parse_messages({"messages": [{"role": "user", "content": [{"type": "gif"}]}]})

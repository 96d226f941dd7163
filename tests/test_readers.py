"""Readers of real data set formats: small LLaVA, Hugging Face and WebDataset sets made on the
spot with real image and WAV files, converted, and read back with Entrain's own readers."""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tarfile
import types
import wave
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from rich.console import Console

from entrain.cli_common import UserError
from entrain.cli_data import FORMATS, add_manifest_parser, cmd_manifest
from entrain.data.readers import READERS, ReaderError, ReaderOptions, convert
from entrain.runtime.inputs import load_records
from entrain.workload.manifest import read_manifest

RATE = 16_000
SENTENCES = [
    "what is in the picture",
    "a red square on a dark background",
    "describe the sound",
    "a tone at four hundred hertz",
    "two pictures of a blue circle",
]


def image_bytes(w: int, h: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, fmt)
    return buf.getvalue()


def write_image(path: Path, w: int, h: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(w, h, "JPEG" if path.suffix == ".jpg" else "PNG"))
    return path


def wav_bytes(frames: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((np.sin(np.arange(frames) / 5.0) * 8000).astype(np.int16).tobytes())
    return buf.getvalue()


def estimate(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / 4)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_readable(manifest: Path) -> None:
    """Entrain's manifest reader and training loader both accept it, and every file's
    header agrees with the manifest's sizes."""
    workload = read_manifest(manifest)
    records = load_records(manifest)
    assert [r.id for r in records] == workload.ids
    for rec, line in zip(records, lines(manifest)):
        for path, (h, w) in zip(rec.images, line.get("image", [])):
            with Image.open(path) as im:
                assert (im.height, im.width) == (h, w)
        for path, seconds in zip(rec.audio, line.get("audio", [])):
            with wave.open(str(path)) as wv:
                assert wv.getnframes() / wv.getframerate() == seconds


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny WordLevel tokenizer trained here, saved as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    folder = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    return folder, tok


# ------------------------------------------------------------------------------- llava


def llava_set(root: Path) -> Path:
    """Three records with 0, 1 and 2 images (PNG and JPEG of different sizes)."""
    write_image(root / "images" / "a.png", 40, 30)
    write_image(root / "images" / "b.jpg", 64, 48)
    write_image(root / "images" / "c.png", 20, 100)
    data = [
        {
            "id": "t0",
            "conversations": [
                {"from": "human", "value": "describe the sound"},
                {"from": "gpt", "value": "a tone at four hundred hertz"},
            ],
        },
        {
            "id": "i1",
            "image": "images/a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat is in the picture"},
                {"from": "gpt", "value": "a red square on a dark background"},
            ],
        },
        {
            "id": 7,  # integer ids are common in ShareGPT dumps
            "image": ["images/b.jpg", "images/c.png"],
            "conversations": [
                {"from": "human", "value": "<image> <image> what is in the picture"},
                {"from": "gpt", "value": "two pictures of a blue circle"},
            ],
        },
    ]
    path = root / "data.json"
    path.write_text(json.dumps(data))
    return path


LLAVA_TEXT = [
    "describe the sound\na tone at four hundred hertz",
    "what is in the picture\na red square on a dark background",
    "what is in the picture\ntwo pictures of a blue circle",
]


def test_llava_sizes_ids_and_estimated_tokens(tmp_path):
    src = llava_set(tmp_path)
    out = tmp_path / "manifest.jsonl"
    seen = []
    summary = convert("llava", src, out, on_progress=seen.append)
    assert (summary.written, summary.skipped, summary.tokenizer) == (3, 0, "estimate")
    assert sum(seen) == 3 and summary.files_dir is None  # items stay where they are
    recs = lines(out)
    assert [r["id"] for r in recs] == ["t0", "i1", "7"]
    assert [r["text"] for r in recs] == LLAVA_TEXT
    assert [r["text_tokens"] for r in recs] == [estimate(t) for t in LLAVA_TEXT]
    assert [r.get("image") for r in recs] == [None, [[30, 40]], [[48, 64], [100, 20]]]
    assert recs[2]["files"] == {"image": ["images/b.jpg", "images/c.png"]}
    assert all(r["tokenizer"] == "estimate" for r in recs)
    check_readable(out)
    assert not (tmp_path / "manifest.jsonl.tmp").exists()


def test_llava_image_root_and_local_tokenizer(tmp_path, tokenizer_dir):
    folder, tok = tokenizer_dir
    src = llava_set(tmp_path / "set")
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (tmp_path / "set" / "images").rename(moved / "images")
    out = tmp_path / "out" / "m.jsonl"  # in another folder: files are relative to it
    opts = ReaderOptions(image_root=str(moved), tokenizer=str(folder))
    summary = convert("llava", src, out, opts)
    assert summary.tokenizer == f"hf:{folder}"
    recs = lines(out)
    assert [r["text_tokens"] for r in recs] == [len(tok.encode(t).ids) for t in LLAVA_TEXT]
    assert recs[1]["text_tokens"] == 12  # 5 + 7 words, no special tokens
    assert recs[1]["files"]["image"] == ["../elsewhere/images/a.png"]
    check_readable(out)


def test_llava_errors_name_file_record_and_field(tmp_path):
    src = llava_set(tmp_path)
    (tmp_path / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    data = json.loads(src.read_text())
    data[1]["image"] = "nope.png"
    data.append({"id": "c", "image": "images/bad.png", "conversations": []})
    data.append({"id": "t0", "conversations": []})  # a duplicate id
    data.append({"id": "d", "conversations": "hello"})
    src.write_text(json.dumps(data))
    out = tmp_path / "m.jsonl"
    with pytest.raises(ReaderError) as e:
        convert("llava", src, out)
    assert str(e.value).startswith(f"{src}: record 1 (id 'i1'): image 'nope.png': no such file")
    assert not out.exists() and not (tmp_path / "m.jsonl.tmp").exists()

    summary = convert("llava", src, out, ReaderOptions(skip_bad=True))
    assert (summary.written, summary.skipped) == (2, 4)
    why = summary.skipped_examples
    assert "record 3 (id 'c'): image 'images/bad.png': not a readable image" in why[1]
    assert "record 4 (id 't0'): id: duplicate id (already on line 1" in why[2]
    assert "record 5 (id 'd'): conversations: expected a list" in why[3]
    assert [r["id"] for r in lines(out)] == ["t0", "7"]
    check_readable(out)


def test_llava_jsonl_and_whole_file_errors(tmp_path):
    write_image(tmp_path / "a.png", 8, 6)
    src = tmp_path / "data.jsonl"
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>hi"}]}
    src.write_text(json.dumps(good) + "\n\n{not json\n" + json.dumps(good) + "\n")
    summary = convert("llava", src, tmp_path / "m.jsonl", ReaderOptions(skip_bad=True))
    assert (
        summary.skipped == 1 and "data.jsonl: line 3: not valid JSON" in summary.skipped_examples[0]
    )
    assert [r["id"] for r in lines(tmp_path / "m.jsonl")] == ["1", "4"]  # line numbers
    (tmp_path / "list.json").write_text('{"id": 1}')
    with pytest.raises(ReaderError, match="list.json: expected a JSON list of records, got dict"):
        convert("llava", tmp_path / "list.json", tmp_path / "m2.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="empty.json: no sample could be converted"):
        convert("llava", tmp_path / "empty.json", tmp_path / "m3.jsonl")
    assert not (tmp_path / "m3.jsonl").exists()


# ---------------------------------------------------------------------------------- hf

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def test_hf_parquet_image_bytes(tmp_path):
    """HF's Image feature as parquet stores {"bytes", "path"}; bytes are written out."""
    folder = tmp_path / "ds"
    folder.mkdir()
    sizes = [(32, 24), (50, 70), None, (16, 16)]
    cells = [
        None if s is None else {"bytes": image_bytes(*s, fmt), "path": f"orig{k}.x"}
        for k, (s, fmt) in enumerate(zip(sizes, ["PNG", "JPEG", "PNG", "WEBP"]))
    ]
    texts = ["a red square", "a blue circle on the left", "only text here", "tiny"]
    for part in (0, 1):
        rows = slice(2 * part, 2 * part + 2)
        table = pa.table(
            {
                "id": [f"s{k}" for k in range(4)][rows],
                "caption": texts[rows],
                "img": pa.array(cells[rows], type=IMAGE_TYPE),
            }
        )
        pq.write_table(table, folder / f"train-{part:05d}-of-00002.parquet")
    out = tmp_path / "out" / "train.jsonl"
    opts = ReaderOptions(text_column="caption", image_column="img")
    summary = convert("hf", folder, out, opts)
    assert (summary.written, summary.files_written) == (4, 3)
    assert summary.files_dir == str(tmp_path / "out" / "train_files")
    recs = lines(out)
    assert [r["id"] for r in recs] == ["s0", "s1", "s2", "s3"]
    assert [r["text_tokens"] for r in recs] == [estimate(t) for t in texts]
    assert [r.get("image") for r in recs] == [[[24, 32]], [[70, 50]], None, [[16, 16]]]
    assert recs[1]["files"]["image"][0].endswith(".jpg")  # the real format, not "orig1.x"
    assert recs[3]["files"]["image"][0].endswith(".webp")
    records = load_records(out)
    assert records[0].images[0].read_bytes() == cells[0]["bytes"]
    check_readable(out)


def save_to_disk_set(folder: Path) -> Path:
    """What datasets' save_to_disk writes, made with pyarrow: an Arrow IPC stream file,
    dataset_info.json and state.json. Images as a list per row, audio as WAV bytes."""
    folder.mkdir()
    images = [
        [{"bytes": image_bytes(12, 10), "path": None}, {"bytes": image_bytes(30, 8), "path": None}],
        [],
        [{"bytes": None, "path": "pic.png"}],
    ]
    write_image(folder / "pic.png", 9, 7)
    audio = [
        {"bytes": wav_bytes(24_000), "path": "a.wav"},
        None,
        {"bytes": wav_bytes(800), "path": None},
    ]
    table = pa.table(
        {
            "messages": [
                [
                    {"role": "user", "content": "<image><image>describe"},
                    {"role": "assistant", "content": "two"},
                ],
                [{"role": "user", "content": "hello"}],
                [{"role": "user", "content": "one more"}],
            ],
            "images": pa.array(images, type=pa.list_(IMAGE_TYPE)),
            "audio": pa.array(audio, type=IMAGE_TYPE),
        }
    )
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=2)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}]}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


def test_hf_save_to_disk_arrow_stream(tmp_path):
    folder = save_to_disk_set(tmp_path / "saved")
    opts = ReaderOptions(text_column="messages", image_column="images", audio_column="audio")
    out = tmp_path / "m.jsonl"
    summary = convert("hf", folder, out, opts)
    assert summary.written == 3 and summary.notes == ["no 'id' column: ids are row numbers"]
    recs = lines(out)
    assert [r["id"] for r in recs] == ["0", "1", "2"]
    assert [r["text"] for r in recs] == ["describe\ntwo", "hello", "one more"]
    assert [r.get("image") for r in recs] == [[[10, 12], [8, 30]], None, [[7, 9]]]
    assert [r.get("audio") for r in recs] == [[1.5], None, [0.05]]
    assert recs[0]["files"]["audio"][0].endswith(".wav")
    assert recs[2]["files"]["image"] == ["saved/pic.png"]  # a path cell: not copied
    check_readable(out)


def test_hf_errors_name_file_row_and_column(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "text": ["x", None, "z"],
            "image": pa.array(
                [
                    {"bytes": image_bytes(5, 5), "path": "a.png"},
                    None,
                    {"bytes": b"junk", "path": "c.png"},
                ],
                type=IMAGE_TYPE,
            ),
        }
    )
    f = folder / "part.parquet"
    pq.write_table(table, f)
    with pytest.raises(ReaderError, match=r"part.parquet: column 'caption': no such column"):
        convert("hf", folder, tmp_path / "m.jsonl", ReaderOptions(text_column="caption"))
    with pytest.raises(ReaderError) as e:
        convert("hf", folder, tmp_path / "m.jsonl", ReaderOptions(image_column="image"))
    assert (
        str(e.value)
        == f"{f}: row 1 (id 'b'): column 'text': expected text or conversation turns, got None"
    )
    opts = ReaderOptions(image_column="image", skip_bad=True)
    summary = convert("hf", folder, tmp_path / "m.jsonl", opts)
    assert (summary.written, summary.skipped) == (1, 2)
    assert (
        "row 2 (id 'c'): column 'image' ('c.png'): not a readable image"
        in summary.skipped_examples[1]
    )
    assert summary.files_written == 1  # the bad record's bytes were not written out
    check_readable(tmp_path / "m.jsonl")
    summary = convert("hf", folder, tmp_path / "t.jsonl", ReaderOptions(skip_bad=True))
    assert "column 'image' was not read (no --image-column given)" in summary.notes


# --------------------------------------------------------------------------- webdataset


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)
    return path


def test_webdataset_shards(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(
        shards / "s-000.tar",
        [
            ("k1.jpg", image_bytes(40, 20, "JPEG")),
            ("k1.txt", b"a red square\n"),
            ("sub/k2.png", image_bytes(11, 13)),
            ("sub/k2.json", json.dumps({"caption": "a blue circle", "w": 11}).encode()),
            ("sub/k2.cls", b"3"),
        ],
    )
    write_shard(
        shards / "s-001.tar",
        [
            ("k3.wav", wav_bytes(4_000)),
            ("k3.txt", "ein Tön".encode()),
            ("k3.left.png", image_bytes(6, 4)),
        ],
    )
    out = tmp_path / "wds.jsonl"
    summary = convert("webdataset", shards, out)
    assert (summary.written, summary.files_written) == (3, 4)
    assert summary.notes == ["tar members of other types were not read: 1 .cls"]
    recs = lines(out)
    assert [r["id"] for r in recs] == ["k1", "sub/k2", "k3"]
    assert [r["text"] for r in recs] == ["a red square", "a blue circle", "ein Tön"]
    assert recs[2]["text_tokens"] == 2  # 8 UTF-8 bytes / 4
    assert [r.get("image") for r in recs] == [[[20, 40]], [[13, 11]], [[4, 6]]]
    assert recs[2]["audio"] == [0.25]
    check_readable(out)
    # a glob of shards and one shard alone read the same members
    assert convert("webdataset", str(shards / "s-*.tar"), tmp_path / "g.jsonl").written == 3
    assert convert("webdataset", shards / "s-001.tar", tmp_path / "one.jsonl").written == 1


def test_webdataset_errors_name_shard_key_and_member(tmp_path):
    shard = write_shard(
        tmp_path / "bad.tar",
        [
            ("a.jpg", b"\xff\xd8not really a jpeg"),
            ("a.txt", b"x"),
            ("b.png", image_bytes(3, 3)),
            ("b.json", b'{"url": "no text here"}'),
            ("c.txt", b"fine"),
            ("d.wav", b"RIFF\x10\x00\x00\x00WAVEjunk"),
            ("d.txt", b"x"),
            ("e.wav", wav_bytes(0)),
        ],
    )
    with pytest.raises(ReaderError) as e:
        convert("webdataset", shard, tmp_path / "m.jsonl")
    assert str(e.value).startswith(f"{shard}: key 'a': member 'a.jpg': not a readable image")
    summary = convert("webdataset", shard, tmp_path / "m.jsonl", ReaderOptions(skip_bad=True))
    assert (summary.written, summary.skipped) == (1, 4)
    assert summary.skipped_examples[1] == (
        f"{shard}: key 'b': member 'b.json': no \"text\" or \"caption\" string"
    )
    assert summary.skipped_examples[2].startswith(
        f"{shard}: key 'd': member 'd.wav': not a WAV file the stdlib can read"
    )
    assert (
        summary.skipped_examples[3]
        == f"{shard}: key 'e': member 'e.wav': holds no audio (duration 0.0 s)"
    )
    (tmp_path / "broken.tar").write_bytes(b"this is no tar file" * 40)
    with pytest.raises(ReaderError, match="broken.tar: not a readable tar shard"):
        convert("webdataset", tmp_path / "broken.tar", tmp_path / "n.jsonl")
    with pytest.raises(ReaderError, match="no file matches"):
        convert("webdataset", str(tmp_path / "none-*.tar"), tmp_path / "n.jsonl")


def _cut_shard_cases(tmp_path: Path) -> tuple[bytes, list[tuple[int, str]]]:
    """A three-sample shard and where to cut it, each cut with what the error must say.

    Members are 512-byte headers each followed by data padded to 512 bytes: k1.txt's header
    at 0, k2.cls at 1024, k2.txt at 2560, k3.txt at 3584; the end-of-archive marker at 4608.
    """
    shard = write_shard(
        tmp_path / "whole.tar",
        [("k1.txt", b"one" * 10), ("k2.cls", b"x" * 700), ("k2.txt", b"two"), ("k3.txt", b"3")],
    )
    data = shard.read_bytes()
    assert not any(data[4608:5120]) and data[3584:3590] == b"k3.txt"  # the layout above
    cuts = [
        (100, "ends at byte 100, inside the first header"),
        (512, "ends at byte 512, inside member 'k1.txt' (bytes 0 to 1024)"),
        (1024, "ends at byte 1024 after member 'k1.txt', with no end-of-archive marker"),
        (
            1300,
            "ends at byte 1300, inside the header that starts at byte 1024 (after member 'k1.txt')",
        ),
        (1536, "ends at byte 1536, inside member 'k2.cls' (bytes 1024 to 2560)"),  # not read
        (2560, "ends at byte 2560 after member 'k2.cls', with no end-of-archive marker"),
        (
            2700,
            "ends at byte 2700, inside the header that starts at byte 2560 (after member 'k2.cls')",
        ),
        (3072, "ends at byte 3072, inside member 'k2.txt' (bytes 2560 to 3584)"),
        (3300, "ends at byte 3300, inside member 'k2.txt' (bytes 2560 to 3584)"),
        (4300, "ends at byte 4300, inside member 'k3.txt' (bytes 3584 to 4608)"),
        (4608, "ends at byte 4608 after member 'k3.txt', with no end-of-archive marker"),
        (
            4700,
            "ends at byte 4700, inside the header that starts at byte 4608 (after member 'k3.txt')",
        ),
    ]
    return data, cuts


def test_webdataset_truncated_shard_names_file_and_byte(tmp_path):
    """A shard cut anywhere, inside a header or a member, at a block boundary or not, stops
    with one error naming the shard and where it ends: never fewer samples or empty text."""
    data, cuts = _cut_shard_cases(tmp_path)
    assert convert("webdataset", tmp_path / "whole.tar", tmp_path / "whole.jsonl").written == 3
    for cut, where in cuts:
        shard = tmp_path / f"cut-{cut}.tar"
        shard.write_bytes(data[:cut])
        out = tmp_path / f"cut-{cut}.jsonl"
        for options in (ReaderOptions(), ReaderOptions(skip_bad=True)):
            with pytest.raises(ReaderError) as e:
                convert("webdataset", shard, out, options)
            want = f"{shard}: truncated tar shard: it {where}; copy or write it again"
            assert str(e.value) == want, cut
            assert not out.exists() and not out.with_name(out.name + ".tmp").exists()
    # one zero block after the last member is enough to end an archive (as GNU tar reads it)
    (tmp_path / "one-zero-block.tar").write_bytes(data[:5120])
    assert convert("webdataset", tmp_path / "one-zero-block.tar", tmp_path / "z.jsonl").written == 3


def test_webdataset_truncated_compressed_shard(tmp_path):
    """gzip shards cut short: tarfile's own gzip reader takes a cut at a header for the end."""
    import gzip

    data, _ = _cut_shard_cases(tmp_path)
    packed = gzip.compress(data)
    whole = tmp_path / "whole.tar.gz"
    whole.write_bytes(packed)
    convert("webdataset", whole, tmp_path / "w.jsonl")
    assert [r["text"] for r in lines(tmp_path / "w.jsonl")] == ["one" * 10, "two", "3"]
    for cut in range(20, len(packed), 7):
        shard = tmp_path / f"cut-{cut}.tar.gz"
        shard.write_bytes(packed[:cut])
        with pytest.raises(ReaderError) as e:
            convert("webdataset", shard, tmp_path / "c.jsonl")
        assert str(e.value).startswith(
            f"{shard}: truncated tar shard: the compressed file ends at byte {cut} before its "
            "end-of-stream marker"
        ), cut
    # a whole gzip stream around a tar with no end-of-archive marker
    shard = tmp_path / "no-marker.tar.gz"
    shard.write_bytes(gzip.compress(data[:4608]))
    with pytest.raises(ReaderError, match="ends at byte 4608 of the uncompressed archive after"):
        convert("webdataset", shard, tmp_path / "c.jsonl")


def test_webdataset_garbage_after_a_member_is_an_error(tmp_path):
    """tarfile stops silently at a header it cannot parse after the first member too."""
    data, _ = _cut_shard_cases(tmp_path)
    shard = tmp_path / "garbled.tar"
    shard.write_bytes(data[:2560] + b"\x01" * 512 + data[3072:])
    with pytest.raises(ReaderError) as e:
        convert("webdataset", shard, tmp_path / "g.jsonl")
    assert str(e.value) == f"{shard}: no valid tar header at byte 2560 (after member 'k2.cls')"


def test_bytes_tokenizer_output_passes_training_validation(tmp_path):
    """With "bytes", text_tokens are what `entrain train` counts, so its pre-training
    check (files decode, sizes and durations match, token counts match) finds nothing."""
    from entrain.models.presets import PRESETS
    from entrain.runtime.validate import validate_samples

    shard = write_shard(
        tmp_path / "s.tar",
        [
            ("a.png", image_bytes(40, 28)),
            ("a.txt", "größer als".encode()),
            ("b.wav", wav_bytes(20_000)),
            ("b.txt", b"a tone"),
        ],
    )
    out = tmp_path / "m.jsonl"
    summary = convert("webdataset", shard, out, ReaderOptions(tokenizer="bytes"))
    assert summary.tokenizer == "bytes"
    assert [r["text_tokens"] for r in lines(out)] == [12, 6]  # UTF-8 bytes
    assert validate_samples(load_records(out), read_manifest(out), PRESETS["tiny"]()) == []


def test_audio_other_than_wav_needs_soundfile(tmp_path, monkeypatch):
    shard = write_shard(tmp_path / "a.tar", [("k.mp3", b"ID3 fake mp3 frames"), ("k.txt", b"hi")])
    monkeypatch.setitem(sys.modules, "soundfile", None)  # as if not installed
    with pytest.raises(ReaderError, match="member 'k.mp3': not a WAV file: only WAV is supported"):
        convert("webdataset", shard, tmp_path / "m.jsonl")
    fake = types.SimpleNamespace(info=lambda f: types.SimpleNamespace(duration=2.5))
    monkeypatch.setitem(sys.modules, "soundfile", fake)
    convert("webdataset", shard, tmp_path / "m.jsonl")
    rec = lines(tmp_path / "m.jsonl")[0]
    assert rec["audio"] == [2.5] and rec["files"]["audio"][0].endswith(".mp3")


# ------------------------------------------------------------------- options and the CLI


def test_options_are_checked():
    with pytest.raises(ValueError, match="text_column must be a non-empty column name"):
        ReaderOptions(text_column="")
    with pytest.raises(ValueError, match="image_column do not apply to the llava format"):
        convert("llava", "x.json", "m.jsonl", ReaderOptions(image_column="img"))
    with pytest.raises(ValueError, match="unknown format 'coco'"):
        convert("coco", "x.json", "m.jsonl")
    assert FORMATS == tuple(READERS)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="entrain")
    add_manifest_parser(parser.add_subparsers())
    return parser.parse_args(["manifest", *argv])


def test_cli_manifest(tmp_path, capsys, tokenizer_dir):
    src = llava_set(tmp_path)
    out = tmp_path / "m.jsonl"
    err = Console(file=io.StringIO(), width=200)
    args = parse(
        ["llava", str(src), "-o", str(out), "--json", "--tokenizer", str(tokenizer_dir[0])]
    )
    assert args.func(args, err) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["written"], summary["skipped"]) == (3, 0)
    assert summary["tokenizer"] == f"hf:{tokenizer_dir[0]}"
    check_readable(out)

    (tmp_path / "images" / "c.png").unlink()
    args = parse(["llava", str(src), "-o", str(out), "--skip-bad", "--overwrite"])
    assert cmd_manifest(args, err) == 0
    said = err.file.getvalue()
    assert "skipped 1 record(s)" in said and "record 2 (id '7'): image 'images/c.png'" in said
    assert "wrote 2 samples" in said and "(text tokens: estimate)" in said

    with pytest.raises(UserError, match="--image-column: not used by the llava format"):
        cmd_manifest(
            parse(["llava", str(src), "-o", str(out), "--image-column", "i", "--overwrite"]), err
        )
    with pytest.raises(UserError, match="tokenizer folder '.*nowhere' not found"):
        cmd_manifest(
            parse(["llava", str(src), "-o", str(out), "--tokenizer", "nowhere", "--overwrite"]), err
        )
    with pytest.raises(ReaderError, match="record 2 .*no such file"):
        cmd_manifest(parse(["llava", str(src), "-o", str(out), "--overwrite"]), err)
    with pytest.raises(UserError, match="exists and is not empty; pass --overwrite"):
        cmd_manifest(parse(["llava", str(src), "-o", str(out)]), err)

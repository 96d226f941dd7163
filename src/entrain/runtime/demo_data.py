"""A small real image-caption(-audio) data set made on the spot: PNG files of varied sizes
and counts per sample, captions of varied length, and some 16 kHz WAV clips.

Captions describe the picture they come with (the colour and shape drawn), so a model can
actually learn something from it in a few steps; the manifest is written from the files,
so its sizes are the files' sizes.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from entrain.data.codec import ByteTokenizer, TextCodec
from entrain.runtime.inputs import SAMPLE_RATE, Record, manifest_line, to_json_line

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "stripe")


def _image(rng: np.random.Generator, path: Path, sides: tuple[int, int]) -> str:
    h, w = (int(x) for x in rng.integers(sides[0], sides[1], size=2))
    colour = str(rng.choice(list(COLOURS)))
    shape = str(rng.choice(SHAPES))
    img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 60, size=3)))
    d = ImageDraw.Draw(img)
    box = (w // 5, h // 5, 4 * w // 5, 4 * h // 5)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.rectangle((0, h // 3, w, 2 * h // 3), fill=COLOURS[colour])
    img.save(path)
    return f"a {colour} {shape}"


def _wav(rng: np.random.Generator, path: Path) -> str:
    seconds = round(float(rng.uniform(0.5, 24.0)), 2)
    n = int(round(seconds * SAMPLE_RATE))
    tone = float(rng.choice([220.0, 440.0, 880.0]))
    t = np.arange(n) / SAMPLE_RATE
    x = 0.3 * np.sin(2 * np.pi * tone * t) + 0.02 * rng.standard_normal(n)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype(np.int16).tobytes())
    return f"a tone at {int(tone)} hertz"


DETAILS = (
    "the shape sits in the middle of the frame",
    "its edges are sharp and the fill is even",
    "the background is dark and plain",
    "nothing else is drawn around it",
)


QUESTIONS = ("what does this show?", "describe it.", "what is here?")


def write_video(path: Path, frames: list[np.ndarray], fps: int = 2) -> None:
    """An MPEG-4 file of (H, W, 3) uint8 frames, written with PyAV."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _video(rng: np.random.Generator, path: Path, frames: int) -> tuple[str, list[int]]:
    """A square moving across a plain background; `frames` frames of an even size (MPEG-4
    needs one). A name ending in / is written as a folder of PNG frames instead."""
    h, w = (2 * int(x) for x in rng.integers(20, 48, size=2))
    colour = str(rng.choice(list(COLOURS)))
    side = min(h, w) // 3
    pictures = []
    for k in range(frames):
        img = Image.new("RGB", (w, h), (10, 10, 30))
        x = int((w - side) * k / max(1, frames - 1))
        ImageDraw.Draw(img).rectangle((x, h // 3, x + side, h // 3 + side), fill=COLOURS[colour])
        pictures.append(np.asarray(img))
    if path.suffix:
        write_video(path, pictures)
    else:
        path.mkdir(parents=True, exist_ok=True)
        for k, arr in enumerate(pictures):
            Image.fromarray(arr).save(path / f"{k:04d}.png")
    return f"a {colour} square moving right", [frames, h, w]


def make_demo_data(
    root: str | Path,
    n: int,
    seed: int = 0,
    audio_share: float = 0.3,
    vocab: int = 512,
    long_text: float = 0.0,
    sides: tuple[int, int] = (40, 240),
    codec: TextCodec | None = None,
    chat: bool = False,
    video_share: float = 0.0,
    video_frames: tuple[int, int] = (2, 9),
) -> Path:
    """Write `n` samples under `root` (images/, audio/, manifest.jsonl); returns the manifest.

    `long_text` is the share of samples whose caption goes on with a long description, so
    that LLM work varies independently of the images (as in instruction data, where a
    short answer and a long one can come with the same picture); `sides` bounds the image
    heights and widths in pixels. `codec` counts the text tokens (default: the byte tokenizer
    of a `vocab`-sized vocabulary, what the presets train with). `chat`: each sample is a
    conversation (a user turn with the items and a question, the caption as the assistant's
    answer) instead of plain text. `video_share`: the share of samples with a short video
    (`video_frames` bounds its frame count), every other one an MPEG-4 file, the rest a
    folder of PNG frames."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tok = codec or ByteTokenizer(vocab)
    lines = []
    for i in range(n):
        sid = f"demo-{i:05d}"
        images, audio, said = [], [], []
        for k in range(int(rng.choice([0, 1, 1, 2, 3]))):
            p = root / "images" / f"{sid}-{k}.png"
            said.append(_image(rng, p, sides))
            images.append(p)
        if rng.random() < audio_share:
            p = root / "audio" / f"{sid}.wav"
            said.append(_wav(rng, p))
            audio.append(p)
        videos, video_sizes = [], []
        if video_share and rng.random() < video_share:
            (root / "video").mkdir(exist_ok=True)
            p = root / "video" / (f"{sid}.mp4" if len(lines) % 2 else sid)
            n_frames = int(rng.integers(video_frames[0], video_frames[1]))
            caption, size = _video(rng, p, n_frames)
            said.append(caption)
            videos.append(p)
            video_sizes.append(size)
        filler = " and".join([""] * int(rng.integers(0, 4)))
        text = "this shows " + ", then ".join(said or ["nothing at all"]) + filler + "."
        if long_text and rng.random() < long_text:  # no draw when off: same data as before
            text += "".join(
                f" {DETAILS[i % len(DETAILS)]}." for i in range(int(rng.integers(2, 9)))
            )
        rec = Record(id=sid, line=i + 1, text=text, images=images, audio=audio, videos=videos)
        if chat:
            question = QUESTIONS[i % len(QUESTIONS)]
            items = [{"type": m} for m, paths in (("image", images), ("video", videos),
                                                  ("audio", audio)) for _ in paths]  # fmt: skip
            rec.text, rec.messages = (
                None,
                [
                    {"role": "user", "content": [*items, {"type": "text", "text": question}]},
                    {"role": "assistant", "content": [{"type": "text", "text": text}]},
                ],
            )
        entry = manifest_line(rec, tok)
        entry["files"] = {
            "image": [str(p.relative_to(root)) for p in images],
            "audio": [str(p.relative_to(root)) for p in audio],
        }
        if videos:
            entry["video"] = video_sizes
            entry["files"]["video"] = [str(p.relative_to(root)) for p in videos]
        lines.append(to_json_line(entry))
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest

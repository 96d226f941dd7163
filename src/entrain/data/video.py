"""Video files and folders of frames: their sizes from headers, and frames taken uniformly
over a clip, decoded once as a stream with PyAV. No torch: the manifest tools and the
runtime's decoding workers both use it.

A folder of images (in name order) is a video whose frames were sampled already; a file is
sampled the way qwen-vl-utils samples: the manifest's frame count (the clip's length times
its sampling rate) spread evenly from the first frame to the last.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class VideoError(ValueError):
    """A video that cannot be used; the message names the file (callers add the sample)."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    """Frames in the file (or images in the folder)."""
    fps: float | None
    """The file's frame rate (None for a folder of frames)."""
    height: int
    width: int

    @property
    def seconds(self) -> float | None:
        return self.frames / self.fps if self.fps else None


def _frame_files(path: Path) -> list[Path]:
    return sorted(f for f in path.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)


def video_info(path: Path) -> VideoInfo:
    """A video's frame count, rate and frame size from its headers (a folder: its images)."""
    path = Path(path)
    if path.is_dir():
        files = _frame_files(path)
        if not files:
            raise VideoError(f"{path} holds no frame images ({', '.join(FRAME_SUFFIXES)})")
        try:
            with Image.open(files[0]) as im:
                return VideoInfo(len(files), None, im.height, im.width)
        except (OSError, ValueError) as e:
            raise VideoError(f"cannot read frame {files[0]}: {e}") from None
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = float(stream.average_rate) if stream.average_rate else None
            return VideoInfo(_frame_count(container, stream), rate, stream.height, stream.width)
    except (av.error.FFmpegError, OSError, IndexError, ValueError) as e:
        raise VideoError(f"cannot decode video {path}: {e}") from None


def _frame_count(container, stream) -> int:
    """Frames of the stream: its header's count, else its duration times its rate, else
    counted by decoding (some containers state neither)."""
    if stream.frames:
        return int(stream.frames)
    if stream.duration and stream.average_rate:
        return int(round(float(stream.duration * stream.time_base) * float(stream.average_rate)))
    n = sum(1 for _ in container.decode(stream))
    container.seek(0)
    return n


def sampled_frames(info: VideoInfo, fps: float, temporal_patch: int = 2) -> int:
    """Frames a clip gives at `fps` (at least one temporal patch, at most all it has)."""
    if info.seconds is None:  # frames sampled already
        return info.frames
    n = int(round(info.seconds * fps))
    return int(min(info.frames, max(temporal_patch, n)))


def video_frames(path: Path, frames: int) -> list[Image.Image]:
    """`frames` RGB frames: all the images of a folder (in name order), or frames taken
    uniformly over a file's whole length. Short, truncated and undecodable files are
    named."""
    path = Path(path)
    if path.is_dir():
        files = _frame_files(path)
        if len(files) != frames:
            raise VideoError(
                f"{path} holds {len(files)} frame image(s) but the manifest says {frames} frames"
            )
        out = []
        for f in files:
            try:
                with Image.open(f) as im:
                    out.append(im.convert("RGB"))
            except (OSError, ValueError) as e:
                raise VideoError(f"cannot read frame {f}: {e}") from None
        return out
    return _decode(path, frames)


def _decode(path: Path, frames: int) -> list[Image.Image]:
    import av

    out: list[Image.Image] = []
    decoded = 0
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            total = _frame_count(container, stream)
            if total < frames:
                raise VideoError(f"{path} has {total} frames, fewer than the manifest's {frames}")
            want = np.linspace(0, total - 1, frames).round().astype(np.int64)
            for k, frame in enumerate(container.decode(stream)):
                decoded = k + 1
                while len(out) < frames and want[len(out)] == k:
                    out.append(frame.to_image().convert("RGB"))
                if len(out) == frames:
                    break
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, IndexError, ValueError) as e:
        raise VideoError(f"cannot decode video {path}: {e}") from None
    if len(out) < frames:
        raise VideoError(
            f"{path} ends after {decoded} decoded frames, fewer than the manifest's {frames} "
            "(a truncated file?)"
        )
    return out

"""Readers that turn real data set formats into Entrain's manifest (docs/design.md section 4).

`convert(format, path, output)` reads a LLaVA/ShareGPT JSON, a Hugging Face data set
(parquet files or a `save_to_disk` folder) or WebDataset tar shards and writes a training
manifest line by line: sizes from the item files' headers, text tokens from a tokenizer
(or an estimate), plus the text and the item files that `entrain train` reads. Items the
source holds as bytes are written next to the manifest, under `<output stem>_files/`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from entrain.data.readers import hf, llava, webdataset
from entrain.data.readers.common import (
    ManifestWriter,
    RawSample,
    ReaderError,
    ReaderOptions,
    Summary,
    TokenCounter,
    measure,
)

__all__ = [
    "READERS",
    "Reader",
    "ReaderError",
    "ReaderOptions",
    "Summary",
    "check_options",
    "convert",
    "unused_options",
]

# options every format takes
_ALWAYS = frozenset({"tokenizer", "skip_bad"})


@dataclass(frozen=True)
class Reader:
    """One input format: its parser, the options it uses, and a line about it."""

    read: Callable[[Path, ReaderOptions, list[str]], Iterator[RawSample | ReaderError]]
    """Yields each record parsed (or the ReaderError that stopped it); appends notes the
    user should see (an ignored column, ...) to the list."""
    uses: frozenset[str]
    about: str


READERS: dict[str, Reader] = {
    "llava": Reader(llava.read, llava.USES, llava.ABOUT),
    "hf": Reader(hf.read, hf.USES, hf.ABOUT),
    "webdataset": Reader(webdataset.read, webdataset.USES, webdataset.ABOUT),
}


def unused_options(format: str, options: ReaderOptions) -> list[str]:
    """The options set away from their defaults that `format` does not use, sorted."""
    return sorted(options.changed() - READERS[format].uses - _ALWAYS)


def check_options(format: str, options: ReaderOptions) -> None:
    """Refuse an unknown format, or options it would ignore (a typo'd intent, not a no-op)."""
    if format not in READERS:
        raise ValueError(f"unknown format {format!r}; choose from {', '.join(READERS)}")
    extra = unused_options(format, options)
    if extra:
        raise ValueError(f"option(s) {', '.join(extra)} do not apply to the {format} format")


def convert(
    format: str,
    path: str | os.PathLike,
    output: str | os.PathLike,
    options: ReaderOptions | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Summary:
    """Convert the data set at `path` into the manifest `output`; returns what was done.

    A record that cannot be converted raises a ReaderError naming the input file, the
    record and the field; with `options.skip_bad` it is left out and counted instead.
    `on_progress(1)` is called per input record, written or skipped.
    """
    options = options or ReaderOptions()
    check_options(format, options)
    path, output = Path(path), Path(output)
    if path.exists() and output.exists() and path.resolve() == output.resolve():
        raise ValueError(f"{output}: the output would overwrite the input")
    counter = TokenCounter(options.tokenizer)
    summary = Summary(format=format, input=str(path), output=str(output), tokenizer=counter.name)
    writer = ManifestWriter(output, counter.name)
    ok = False
    try:
        for item in READERS[format].read(path, options, summary.notes):
            try:
                if isinstance(item, ReaderError):
                    raise item
                rec, items = measure(item, counter, options.video_fps)
                writer.add(item, rec, items)
            except ReaderError as e:
                if not options.skip_bad:
                    raise
                summary.skip(e)
            if on_progress:
                on_progress(1)
        ok = True
    finally:
        writer.close(ok)
    summary.written, summary.files_written = writer.written, writer.files_written
    if writer.files_written:
        summary.files_dir = str(writer.files_dir)
    if not writer.written:
        first = f"; first: {summary.skipped_examples[0]}" if summary.skipped_examples else ""
        raise ValueError(f"{path}: no sample could be converted ({summary.skipped} skipped{first})")
    return summary

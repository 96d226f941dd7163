"""`entrain manifest`: turn a real data set into a training manifest."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.markup import escape

from entrain.cli_common import UserError, progress_bar

# The reader names, spelled here so that building the parser does not import the readers
# (entrain.data pulls in torch); a test checks they match READERS.
FORMATS = ("llava", "hf", "webdataset")
SHOWN_SKIPS = 10  # skipped records listed on the terminal (all are counted)


def add_manifest_parser(sub) -> argparse.ArgumentParser:
    mp = sub.add_parser(
        "manifest",
        help="turn a LLaVA JSON, Hugging Face data set or WebDataset shards into a manifest",
        description="Read a data set and write a training manifest: image sizes and audio "
        "durations from the files' headers, text tokens from --tokenizer (else an estimate, "
        "ceil(UTF-8 bytes / 4)), the text, and the item files. Images and audio the data set "
        "holds as bytes (parquet cells, tar members) are written to OUTPUT_STEM_files/.",
    )
    mp.add_argument(
        "format",
        choices=FORMATS,
        help="llava: LLaVA/ShareGPT JSON or JSONL; hf: a folder of parquet files or a "
        "save_to_disk folder; webdataset: a .tar shard, a folder of shards or a glob",
    )
    mp.add_argument("path", help="the data set (file, folder or, for webdataset, a glob)")
    mp.add_argument("-o", "--output", required=True, help="manifest file to write (.jsonl)")
    mp.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="local Hugging Face tokenizer folder to count text tokens with; 'bytes' for "
        "Entrain's byte tokenizer (what `entrain train` counts; a folder named bytes: "
        "./bytes); default: estimate ceil(UTF-8 bytes / 4)",
    )
    mp.add_argument(
        "--image-root",
        default=None,
        metavar="DIR",
        help="llava, hf: folder that item paths are relative to (default: the data set's)",
    )
    mp.add_argument(
        "--text-column", default="text", metavar="COL", help="hf: text column (default text)"
    )
    mp.add_argument(
        "--image-column", default=None, metavar="COL", help="hf: image column (default: none)"
    )
    mp.add_argument(
        "--audio-column", default=None, metavar="COL", help="hf: audio column (default: none)"
    )
    mp.add_argument(
        "--id-column",
        default="id",
        metavar="COL",
        help="hf: id column (default id; without it, row numbers)",
    )
    mp.add_argument(
        "--video-fps",
        type=float,
        default=2.0,
        metavar="FPS",
        help="llava: frames a second videos are sampled at (default 2, as qwen-vl-utils); "
        "a video's frame count in the manifest is its length times this",
    )
    mp.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out records that cannot be converted (counted and listed) instead of "
        "stopping at the first",
    )
    mp.add_argument("--json", action="store_true", help="print the summary as JSON")
    mp.set_defaults(func=cmd_manifest)
    return mp


def cmd_manifest(args: argparse.Namespace, err: Console) -> int:
    from entrain.data.readers import ReaderError, ReaderOptions, convert, unused_options

    try:
        options = ReaderOptions(
            tokenizer=args.tokenizer,
            image_root=args.image_root,
            text_column=args.text_column,
            image_column=args.image_column,
            audio_column=args.audio_column,
            id_column=args.id_column,
            skip_bad=args.skip_bad,
            video_fps=args.video_fps,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    extra = unused_options(args.format, options)
    if extra:
        flags = ", ".join("--" + name.replace("_", "-") for name in extra)
        raise UserError(f"{flags}: not used by the {args.format} format")
    try:
        with progress_bar(f"reading {args.format}", None, err) as advance:
            summary = convert(args.format, args.path, args.output, options, on_progress=advance)
    except ReaderError:
        raise
    except ValueError as e:  # the tokenizer folder, pyarrow missing, nothing converted
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
        return 0
    for note in summary.notes:
        err.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if summary.skipped:
        err.print(f"[yellow]skipped {summary.skipped} record(s)[/] that could not be converted:")
        for reason in summary.skipped_examples[:SHOWN_SKIPS]:
            err.print(f"  {escape(reason)}", highlight=False, soft_wrap=True)
        if summary.skipped > SHOWN_SKIPS:
            err.print(f"  ... and {summary.skipped - SHOWN_SKIPS} more")
    files = (
        f", {summary.files_written} item file(s) in {summary.files_dir}"
        if summary.files_dir
        else ""
    )
    err.print(
        f"wrote {summary.written} samples to {escape(summary.output)}{escape(files)} "
        f"(text tokens: {escape(summary.tokenizer)})",
        highlight=False,
    )
    return 0

"""`entrain manifest`: turn a real data set into a training manifest."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from entrain.cli_common import UserError, progress_bar
from entrain.workload.traces import GENERATORS

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
        "--overwrite", action="store_true", help="replace the output file if it is not empty"
    )
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
    for column, default in (("text", "text"), ("image", None), ("audio", None)):
        mp.add_argument(
            f"--{column}-column",
            default=default,
            metavar="COL",
            help=f"hf: {column} column (default: {default or 'none'})",
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

    refuse_to_overwrite(args.output, args.overwrite)
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


def add_trace_parser(sub) -> argparse.ArgumentParser:
    """`entrain trace generate`: synthetic manifests shaped like public data sets."""
    trace = sub.add_parser("trace", help="synthetic traces shaped like public data sets")
    tsub = trace.add_subparsers(dest="trace_command", required=True, metavar="ACTION")
    gen = tsub.add_parser(
        "generate",
        help="write a synthetic manifest",
        description="Write a JSON Lines manifest whose samples follow the statistics of a public "
        "data set (docs/analysis.md lists the sources).",
    )
    gen.add_argument(
        "--kind", required=True, choices=sorted(GENERATORS), help="which data set to imitate"
    )
    gen.add_argument("--n", type=int, required=True, help="number of samples")
    gen.add_argument(
        "--seed", type=int, default=0, help="random seed (same seed, same trace; default 0)"
    )
    gen.add_argument("-o", "--output", required=True, help="manifest file to write (.jsonl)")
    gen.add_argument(
        "--overwrite", action="store_true", help="replace the output file if it is not empty"
    )
    gen.set_defaults(func=cmd_trace_generate)
    return trace


def refuse_to_overwrite(path: str, overwrite: bool) -> None:
    """Stop before writing over a file or folder that holds something, unless asked to: a
    slip in -o should not cost a data set that took hours to make."""
    p = Path(path)
    full = p.is_file() and p.stat().st_size > 0 or p.is_dir() and any(p.iterdir())
    if full and not overwrite:
        kind = "folder" if p.is_dir() else "file"
        raise UserError(
            f"{p}: the {kind} exists and is not empty; pass --overwrite to write over it"
        )


def cmd_trace_generate(args: argparse.Namespace, err: Console) -> int:
    from entrain.workload.traces import write_trace

    if args.n <= 0:
        raise UserError(f"--n must be positive, got {args.n}")
    refuse_to_overwrite(args.output, args.overwrite)
    # the bar shows on a terminal; the file is written under OUTPUT.tmp, removed if stopped
    with progress_bar(f"writing {args.kind}", args.n, err) as advance:
        n = write_trace(args.kind, args.n, args.seed, args.output, on_progress=advance)
    err.print(f"wrote {n} samples of kind {args.kind!r} (seed {args.seed}) to {args.output}")
    return 0


def add_demo_data_parser(sub) -> argparse.ArgumentParser:
    """`entrain demo-data`: a small real data set (PNG, WAV, MP4, captions or chats)."""
    dd = sub.add_parser(
        "demo-data",
        help="make a small real image/audio/caption data set",
        description="Write PNG images of varied sizes and counts per sample, WAV "
        "clips and captions, and a training manifest describing them.",
    )
    dd.add_argument("-o", "--output", required=True, help="directory to write")
    dd.add_argument("--n", type=int, default=96, help="samples (default 96)")
    dd.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    dd.add_argument(
        "--chat",
        action="store_true",
        help="conversations (a user turn with the items and a question, the caption as the "
        "assistant's answer: the loss on the answer only) instead of plain captions",
    )
    dd.add_argument(
        "--video",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of samples with a short video (MPEG-4 files and folders of PNG frames; "
        "default 0)",
    )
    dd.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="a Hugging Face model folder: count text tokens with its tokenizer and "
        "placeholders, so the data trains with `entrain train --model DIR` (default: the "
        "byte tokenizer of the presets)",
    )
    dd.add_argument(
        "--overwrite",
        action="store_true",
        help="write into the directory even if it is not empty (files of the same names are "
        "replaced, others left)",
    )
    dd.set_defaults(func=cmd_demo_data)
    return dd


def cmd_demo_data(args: argparse.Namespace, err: Console) -> int:
    from entrain.runtime.demo_data import make_demo_data

    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    if not 0 <= args.video <= 1:
        raise UserError(f"--video must be a share between 0 and 1, got {args.video}")
    refuse_to_overwrite(args.output, args.overwrite)
    codec = None
    if args.model:
        from entrain.data.codec import HFCodec
        from entrain.models.hf import hf_model

        codec = HFCodec(args.model, hf_model(args.model))
    path = make_demo_data(
        args.output, args.n, seed=args.seed, codec=codec, chat=args.chat, video_share=args.video
    )
    err.print(f"wrote {args.n} samples (PNG images, WAV clips, captions) and {path}")
    return 0

"""`entrain export`: a trained run as a Hugging Face model folder."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from entrain.cli_common import UserError, progress_bar


def cmd_export(args: argparse.Namespace, err: Console) -> int:
    from entrain.runtime.export import ExportError, export

    try:
        with progress_bar("exporting", None, err):
            result = export(
                args.run,
                args.output,
                step=args.checkpoint,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                overwrite=args.overwrite,
            )
    except ExportError as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    extra = " (and audio_encoder/, audio_projector.safetensors)" if result.audio else ""
    err.print(
        f"exported {result.checkpoint} -> {result.output}: {result.tensors} tensors, "
        f"{result.bytes / 1e6:,.1f} MB in {len(result.shards)} shard(s){extra}; "
        "load it with transformers' from_pretrained"
    )
    return 0


def add_export_parser(sub) -> argparse.ArgumentParser:
    """`entrain export RUN -o DIR`: a trained run as a Hugging Face model folder."""
    ex = sub.add_parser(
        "export",
        help="write a trained run's checkpoint as a Hugging Face model folder",
        description="Gather every rank's part of a checkpoint of a run started from a Hugging "
        "Face model folder and write a folder that transformers loads "
        "(from_pretrained): the source folder's config, tokenizer and processor files, and "
        "the trained weights as safetensors shards under the source's tensor names.",
    )
    ex.add_argument("run", help="run directory (entrain train --out), or a checkpoint folder")
    ex.add_argument(
        "--checkpoint",
        type=int,
        default=None,
        metavar="STEP",
        help="the checkpoint after this many steps (default: the latest complete one)",
    )
    ex.add_argument("-o", "--output", required=True, help="folder to write")
    ex.add_argument(
        "--dtype",
        default="source",
        choices=("source", "float32", "bfloat16", "float16"),
        help="dtype of the written weights (default: the source checkpoint's)",
    )
    ex.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="largest safetensors file, as transformers writes them (default 5GB)",
    )
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    ex.add_argument("--json", action="store_true", help="print what was written as JSON")
    ex.set_defaults(func=cmd_export)
    return ex

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

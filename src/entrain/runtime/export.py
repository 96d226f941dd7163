"""`entrain export`: a run's checkpoint as a Hugging Face model folder.

A run started from a model folder names its parameters by the folder's own tensor keys
(runtime/hf_load.py), so exporting is: read the weights out of the distributed checkpoint
(every rank wrote its part; weights shared by replicas or tied across stages once), write
them as safetensors shards in the source's layout and dtype, and copy the source's config,
tokenizer and processor files beside them. One shard is read at a time: memory stays at a
shard's size, not the model's.

The audio encoder of an omni run (`--audio-from`, keys `audio.*`) has no place in a
vision-language folder: it goes to `audio_encoder/` (the Whisper folder with its trained
encoder) and its new projector to `audio_projector.safetensors`.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from entrain.config import TrainConfig, read_run_config
from entrain.runtime import checkpoint
from entrain.runtime.hf_load import INDEX, SafetensorsFolder

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NOT_WEIGHTS = ("optim.", "rng.", "train.")


class ExportError(ValueError):
    """A run or checkpoint that cannot be exported; names the path and why."""


@dataclass
class Exported:
    output: Path
    checkpoint: Path
    source: Path
    tensors: int = 0
    bytes: int = 0
    shards: list[str] = field(default_factory=list)
    audio: bool = False

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in self.__dict__.items()}


def _run_config(run: Path) -> tuple[Path, TrainConfig]:
    """The run directory holding `run` (itself or a parent) and its typed config."""
    for folder in (run, *run.parents):
        if (folder / "config.json").is_file():
            try:
                return folder, read_run_config(folder).config
            except ValueError:
                continue
    raise ExportError(f"{run}: not inside a run directory (no config.json of `entrain train`)")


def find_checkpoint(run: Path, cfg: TrainConfig, step: int | None) -> Path:
    """The checkpoint to export: `run` itself if it is one, else under the run's checkpoint
    folder the one after `step` steps or the latest complete one."""
    if (run / ".metadata").is_file():
        return run
    roots = [run] if list(run.glob(f"{checkpoint.PREFIX}*")) else []
    for folder in (cfg.checkpoint_dir, cfg.resume):
        if folder:
            roots.append(Path(folder))
    roots.append(Path(cfg.out or run) / "checkpoints")
    roots.append(run / "checkpoints")
    for root in roots:
        if step is not None:
            path = root / f"{checkpoint.PREFIX}{step:08d}"
            if (path / ".metadata").is_file():
                return path
            continue
        found = checkpoint.latest(root)
        if found is not None:
            return found
    where = ", ".join(str(r) for r in dict.fromkeys(roots))
    what = f"after step {step}" if step is not None else "complete"
    raise ExportError(
        f"{run}: no {what} checkpoint in {where} (train with --checkpoint-every N to write them)"
    )


def _weights(path: Path) -> dict[str, TensorStorageMetadata]:
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {
        k: v
        for k, v in meta.items()
        if isinstance(v, TensorStorageMetadata) and not k.startswith(_NOT_WEIGHTS)
    }


def _load(path: Path, metas: dict[str, TensorStorageMetadata]) -> dict[str, torch.Tensor]:
    """These tensors of a distributed checkpoint, read in this one process."""
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in metas.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state


def _size_bytes(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    t = text.strip().upper()
    for u, mult in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * mult)
    return int(t)


def _shards(keys: list[str], nbytes: dict[str, int], cap: int) -> list[list[str]]:
    out: list[list[str]] = [[]]
    size = 0
    for k in keys:
        if out[-1] and size + nbytes[k] > cap:
            out.append([])
            size = 0
        out[-1].append(k)
        size += nbytes[k]
    return out


def _copy_side_files(src: Path, dst: Path) -> None:
    """Config, tokenizer, processor and generation files: everything but the weights."""
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name != INDEX:
            shutil.copy2(f, dst / f.name)


def _write(
    ckpt: Path,
    metas: dict[str, TensorStorageMetadata],
    rename: dict[str, str],
    out: Path,
    dtype_of,
    cap: int,
    result: Exported,
) -> None:
    """Write the tensors `rename` maps (checkpoint key -> file key) as shards under `out`."""
    from safetensors.torch import save_file

    keys = sorted(rename, key=lambda k: rename[k])
    nbytes = {
        k: int(torch.Size(metas[k].size).numel()) * dtype_of(rename[k]).itemsize for k in keys
    }
    groups = _shards(keys, nbytes, cap)
    names = (
        ["model.safetensors"]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    weight_map = {}
    for name, group in zip(names, groups):
        state = _load(ckpt, {k: metas[k] for k in group})
        tensors = {rename[k]: state[k].to(dtype_of(rename[k])).contiguous() for k in group}
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        result.tensors += len(tensors)
        result.bytes += sum(t.numel() * t.itemsize for t in tensors.values())
        result.shards.append(str(out / name))
        del state, tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def _dtype_chooser(files: SafetensorsFolder | None, dtype: str):
    """file key -> dtype to write: the asked one, or the source checkpoint's own."""
    if dtype != "source":
        return lambda key: DTYPES[dtype]
    if files is None:  # a run from random weights has no source dtype
        return lambda key: torch.float32
    return lambda key: files.dtype(key) if key in files else torch.float32


def _set_config_dtype(out: Path, dtype: torch.dtype) -> None:
    path = out / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    name = str(dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = name
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def export(
    run: str | os.PathLike,
    output: str | os.PathLike,
    step: int | None = None,
    dtype: str = "source",
    max_shard_size: str = "5GB",
    overwrite: bool = False,
) -> Exported:
    run, output = Path(run), Path(output)
    if not run.exists():
        raise ExportError(f"{run}: no such run directory or checkpoint")
    run_dir, cfg = _run_config(run.resolve())
    source = Path(cfg.model)
    if not (source / "config.json").is_file():
        raise ExportError(
            f"{run_dir}: this run trained {cfg.model!r}, which is not a Hugging Face "
            "model folder; export needs a run started with --model DIR"
        )
    ckpt = find_checkpoint(run, cfg, step)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise ExportError(f"{output}: not empty (pass --overwrite to replace it)")
    try:
        cap = _size_bytes(max_shard_size)
    except ValueError:
        raise ExportError(
            f"--max-shard-size {max_shard_size!r}: expected e.g. 5GB or 500MB"
        ) from None
    metas = _weights(ckpt)
    init = cfg.init_from
    weights_from = source if init in ("same", None) else Path(init)
    files = SafetensorsFolder(weights_from) if init is not None else None
    main = {k: k for k in metas if not k.startswith("audio.")}
    if files is not None:  # every tensor of the source folder, trained, or the error says which
        missing = sorted(set(files.where) - set(main))
        if missing:
            raise ExportError(
                f"{ckpt}: holds no trained value for {len(missing)} tensor(s) of {weights_from}, "
                f"e.g. {missing[0]} (was it written by this run?)"
            )
    if output.exists() and overwrite:
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    result = Exported(output=output, checkpoint=ckpt, source=source)
    _copy_side_files(source, output)
    if cfg.tokenizer:
        _copy_side_files(Path(cfg.tokenizer), output)
    _write(ckpt, metas, main, output, _dtype_chooser(files, dtype), cap, result)
    if dtype != "source" or files is None:
        _set_config_dtype(output, DTYPES.get(dtype, torch.float32))
    if any(k.startswith("audio.") for k in metas):
        _export_audio(ckpt, metas, Path(cfg.audio_from), output, result)
    return result


def _export_audio(
    ckpt: Path, metas: dict, audio_from: Path, output: Path, result: Exported
) -> None:
    """The Whisper folder with its trained encoder, and the new projector on its own."""
    from safetensors.torch import save_file

    enc_keys = {k: k.removeprefix("audio.") for k in metas if k.startswith("audio.")}
    proj = {k: v for k, v in enc_keys.items() if v.startswith("projector.")}
    enc_keys = {k: v for k, v in enc_keys.items() if k not in proj}
    out = output / "audio_encoder"
    out.mkdir()
    _copy_side_files(audio_from, out)
    files = SafetensorsFolder(audio_from)
    trained = _load(ckpt, {k: metas[k] for k in enc_keys})
    state = {key: files.tensor(key) for key in files.where}  # the decoder, unchanged
    for k, key in enc_keys.items():
        state[key] = trained[k].to(state[key].dtype if key in state else torch.float32)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    projector = _load(ckpt, {k: metas[k] for k in proj})
    save_file(
        {proj[k].removeprefix("projector."): v.contiguous() for k, v in projector.items()},
        str(output / "audio_projector.safetensors"),
        metadata={"format": "pt"},
    )
    result.audio = True

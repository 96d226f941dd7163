"""A rank's part of a Hugging Face checkpoint, and nothing more.

Every rank builds the whole model's skeleton from config.json with its parameters on the
meta device (no memory; buffers such as rotary frequencies are real, computed as the model
computes them), keeps the submodules it runs, and reads only their tensors from the
safetensors files, one at a time (safetensors maps the file; a tensor's bytes are read when
it is taken). A rank holding one of two LLM stages so allocates about half the LLM.

Parameters are named by their key in the checkpoint's files (`model.layers.3.mlp.up_proj.
weight`, `visual.blocks.0.attn.qkv.weight`), whatever the module tree of the installed
transformers calls them; transformers' own key mapping relates the two. Checkpoints, the
equivalence tests and `entrain export` all use these names, so an export is the source
folder's layout with new values.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

INDEX = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class WeightsError(ValueError):
    """Weights that cannot be loaded; names the file and the tensor."""


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device and their buffers for
    real: a 7B skeleton costs nothing, and its rotary tables are right."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(
                param.to("meta"), requires_grad=param.requires_grad
            )

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class SafetensorsFolder:
    """The weight files of a model folder: which file holds each tensor, read lazily."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        self.folder = Path(folder)
        self._open = safe_open
        self._handles: dict[tuple[Path, str], object] = {}
        self.where: dict[str, Path] = {}
        index = self.folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise WeightsError(f"{index}: not a safetensors index ({e})") from None
            for key, name in weight_map.items():
                path = self.folder / name
                if not path.is_file():
                    raise WeightsError(
                        f"{index}: tensor {key} is in shard {name}, which is missing from "
                        f"{self.folder}"
                    )
                self.where[key] = path
            return
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise WeightsError(
                f"{self.folder}: no *.safetensors weights (and no {INDEX}); give a folder "
                "saved with save_pretrained, or --init-from none for random weights"
            )
        for path in files:
            for key in self._handle(path).keys():
                self.where[key] = path

    def _handle(self, path: Path, device: str = "cpu"):
        if (path, device) not in self._handles:
            try:
                self._handles[path, device] = self._open(str(path), framework="pt", device=device)
            except Exception as e:  # SafetensorError, OSError: a bad file, said once
                raise WeightsError(
                    f"{path}: cannot read it as safetensors ({e}); the file may be truncated "
                    "or not a safetensors file"
                ) from None
        return self._handles[path, device]

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(self.where[key]).get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        name = self._handle(self.where[key]).get_slice(key).get_dtype()
        return _SAFETENSORS_DTYPES.get(name, torch.float32)

    def tensor(self, key: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """One tensor, read straight to `device` (a GPU rank never stages it in host memory
        as a whole model)."""
        path = self.where[key]
        try:
            return self._handle(path, str(device)).get_tensor(key)
        except Exception as e:
            raise WeightsError(f"{path}: cannot read tensor {key} ({e})") from None


def disk_names(model: nn.Module) -> dict[str, str]:
    """Module name -> checkpoint key of every parameter (tied ones included), from
    transformers' own mapping between its module tree and the files it writes."""
    from transformers.core_model_loading import revert_weight_conversion

    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    marked = {n: torch.tensor(i) for i, n in enumerate(names)}
    reverted = revert_weight_conversion(model, marked)
    out: dict[str, str] = {}
    for key, value in reverted.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise WeightsError(
                f"{type(model).__name__}: its checkpoint format merges or splits tensors; "
                "Entrain loads only formats that rename them"
            )
        out[names[int(value)]] = key
    return out


def tied_sources(model: nn.Module) -> dict[str, str]:
    """Tied parameter -> the parameter it shares (lm_head.weight -> the token embedding)
    when the config ties them."""
    config = model.config
    text = getattr(config, "text_config", None) or config
    tie = getattr(config, "tie_word_embeddings", None)
    if tie is None:
        tie = getattr(text, "tie_word_embeddings", False)
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return dict(keys) if tie and isinstance(keys, dict) else {}


def materialize(
    model: nn.Module,
    parts: list[nn.Module],
    files: SafetensorsFolder | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, nn.Parameter]:
    """Give the parameters of `parts` (submodules of `model`) real values on `device`: read
    from `files`, or, when it is None, drawn from a generator seeded by (seed, key), so every
    rank draws the same values for the same tensor without building the rest. Returns them
    by checkpoint key; a parameter tied to one another part holds is named by that one's
    key, so both ranks save and load one tensor."""
    names = disk_names(model)
    tied = tied_sources(model)
    keep = {id(m) for p in parts for m in p.modules()}
    done: dict[int, nn.Parameter] = {}
    named: dict[str, nn.Parameter] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        if id(module) not in keep:
            continue
        for leaf, param in list(module._parameters.items()):
            if param is None:
                continue
            full = f"{mod_name}.{leaf}" if mod_name else leaf
            if id(param) in done:  # tied within this rank: one parameter
                module._parameters[leaf] = done[id(param)]
                continue
            key = names[tied[full]] if full in tied else names[full]
            if files is None:
                value = _random(key, tuple(param.shape), seed, _init_std(model)).to(device)
            else:
                key_on_disk = checked_key(files, key, full, tuple(param.shape))
                value = files.tensor(key_on_disk, device)
            # a copy of its own: a tensor read on the CPU may still map the file's pages,
            # which training must neither write nor see change under it
            value = value.to(dtype=dtype, copy=value.device.type == "cpu")
            new = nn.Parameter(value, requires_grad=param.requires_grad)
            module._parameters[leaf] = done[id(param)] = new
            named[key] = new
        for leaf, buf in list(module._buffers.items()):
            if buf is not None:
                module._buffers[leaf] = buf.to(device)
    return named


def _init_std(model: nn.Module) -> float:
    config = model.config
    text = getattr(config, "text_config", None) or config
    return float(getattr(text, "initializer_range", getattr(config, "init_std", 0.02)))


def _random(key: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """A fresh tensor for `key`: normal(0, std) for matrices, ones for norm scales, zeros for
    biases (how transformers initializes these models), from its own seeded generator."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    if len(shape) >= 2:
        return torch.empty(shape).normal_(0.0, std, generator=gen)
    if key.endswith("weight") and any(n in key for n in ("norm", "ln", "layernorm")):
        return torch.ones(shape)
    if key.endswith("bias"):
        return torch.zeros(shape)
    return torch.empty(shape).normal_(0.0, std, generator=gen)


def checked_key(files: SafetensorsFolder, key: str, full: str, shape: tuple[int, ...]) -> str:
    """The key under which `files` hold the tensor (the checkpoint's name, or the module
    tree's own in a folder written that way), after checking it is there with `shape`."""
    if key not in files and full in files:
        key = full
    if key not in files:
        raise WeightsError(
            f"{files.folder}: no tensor {key} in its safetensors files (the model's config "
            "needs it)"
        )
    have = files.shape(key)
    if have != shape:
        raise WeightsError(
            f"{files.where[key]}: tensor {key} has shape {list(have)} but the config.json "
            f"beside it makes it {list(shape)}"
        )
    return key


def build_model(folder: str | os.PathLike, architecture: str):
    """The transformers model of a folder's config.json, its parameters on the meta device
    (`materialize` gives the kept ones values)."""
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(
            f"{Path(folder) / 'config.json'}: transformers cannot read it ({e})"
        ) from None
    cls = getattr(transformers, architecture)
    with params_on_meta():
        return cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32)

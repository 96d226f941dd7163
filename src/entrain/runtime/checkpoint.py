"""Checkpoints with torch.distributed.checkpoint: every rank saves what it holds (its
module's weights, their AdamW state, its RNG), plus the step count; resuming restores them
and continues with the next step's global batch, which the step number alone determines
(the data order is a seeded function of epoch and step), so no sample is trained twice or
skipped.

Written atomically: each checkpoint goes to `step-NNNNNNNN.tmp/` and is renamed only once
every rank has written its part and the metadata is complete, then `latest` is replaced.
A crash mid-write leaves a `.tmp` folder that is ignored (and removed by the next save), and
the previous checkpoint stays the latest. Weights of one module replicated over data-
parallel ranks share keys; the checkpoint stores them once.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

PREFIX = "step-"


def _name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _complete(path: Path) -> bool:
    return path.is_dir() and not path.name.endswith(".tmp") and (path / ".metadata").exists()


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root` (None: there is none)."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.exists():
        path = root / pointer.read_text(encoding="utf-8").strip()
        if _complete(path):
            return path
    found = sorted(p for p in root.glob(f"{PREFIX}*") if _complete(p)) if root.is_dir() else []
    return found[-1] if found else None


def _state(
    named: dict[str, torch.nn.Parameter], opt: torch.optim.Optimizer | None, rank: int
) -> dict:
    """What this rank saves and loads, by key: weights by name (shared by replicas of one
    module), their optimizer state, this rank's RNG."""
    state: dict = {name: p.data for name, p in named.items()}
    opt = getattr(opt, "optim", opt)  # ZeRO-1: this rank's shard of the state
    if opt is not None:
        for name, p in named.items():
            for key, value in opt.state.get(p, {}).items():
                state[f"optim.{name}.{key}"] = value
    state[f"rng.rank{rank}"] = torch.get_rng_state()
    return state


def save(
    root: str | os.PathLike,
    step: int,
    named: dict[str, torch.nn.Parameter],
    opt: torch.optim.Optimizer | None,
    layout: dict,
    keep: int = 2,
) -> Path:
    """Save after `step` completed steps (a collective: every rank calls it)."""
    root = Path(root)
    rank = dist.get_rank()
    final = root / _name(step)
    tmp = root / f"{_name(step)}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    state = _state(named, opt, rank)
    state["train.step"] = step
    state["train.layout"] = json.dumps(layout, sort_keys=True)  # a string: DCP flattens dicts
    dcp.save(state, checkpoint_id=tmp)
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name + "\n", encoding="utf-8")
        os.replace(pointer, root / "latest")
        for old in sorted(p for p in root.glob(f"{PREFIX}*") if _complete(p))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


class CheckpointMismatch(ValueError):
    """A checkpoint of another run layout (ranks, plan, model) than this one."""


def load(
    path: str | os.PathLike,
    named: dict[str, torch.nn.Parameter],
    opt: torch.optim.Optimizer | None,
    layout: dict,
) -> int:
    """Restore this rank's part of a checkpoint in place; returns the completed steps."""
    rank = dist.get_rank()
    opt = getattr(opt, "optim", opt)  # ZeRO-1: this rank's shard of the state
    if opt is not None:  # AdamW creates its state lazily: make the tensors to load into
        fused = bool(opt.defaults.get("fused"))  # fused AdamW keeps its step on the device
        owned = {id(p) for g in opt.param_groups for p in g["params"]}
        for p in named.values():
            if id(p) in owned and not opt.state.get(p):
                opt.state[p] = {
                    "step": torch.tensor(0.0, device=p.device if fused else "cpu"),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }
    head = {"train.layout": "", "train.step": -1}
    dcp.load(head, checkpoint_id=Path(path))  # first the layout: a mismatch is named, not
    if head["train.layout"] != json.dumps(layout, sort_keys=True):  # a missing-key error
        raise CheckpointMismatch(
            f"{path} was written by another run layout: {head['train.layout']} "
            f"(this run: {json.dumps(layout, sort_keys=True)}); resume with the same model, "
            "ranks and plan"
        )
    state = _state(named, opt, rank)
    dcp.load(state, checkpoint_id=Path(path))
    torch.set_rng_state(state[f"rng.rank{rank}"])
    return int(head["train.step"])

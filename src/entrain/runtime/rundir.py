"""A run directory over its life: who may write into it, and what each segment trained.

A run directory holds one run. Starting a new run into it would mix two runs' lines in
metrics.jsonl and samples.jsonl and two runs' checkpoints in checkpoints/, so it takes
--resume (continue) or --overwrite (replace). A resumed run is a new segment of the same
run: config.json keeps every segment, and a segment may not change what decides which
samples a step trains (the data, the global batch, the seed, the shuffle, dp, the rules
that drop bad samples), because the data order is a function of those and the step number
alone; changing them mid-epoch would skip or repeat samples without a word.

Torch-free: the launcher checks all of this before starting any process.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from pathlib import Path

from entrain.config import ConfigError, RunRecord, TrainConfig, with_absolute_paths
from entrain.runtime.logbook import TENSORBOARD_DIR

RUN_FILES = ("config.json", "metrics.jsonl", "samples.jsonl", "skipped.jsonl", "trace.json")
"""What a run writes into --out by name (checkpoints/ and the globs below besides)."""
RUN_GLOBS = ("memory-*.json", "params-*.pt", "grads-*.pt")
RUN_DIRS = ("checkpoints", TENSORBOARD_DIR)

ORDER_FIELDS = ("data", "global_batch", "seed", "shuffle", "dp", "skip_bad", "max_sample_tokens")
"""The settings that decide which samples step n trains."""


def run_in(out: str | os.PathLike) -> str | None:
    """What of a run `out` holds, in words (None: no run there)."""
    out = Path(out)
    if not out.is_dir():
        return None
    found = [name for name in RUN_FILES if (out / name).exists()]
    found += [d + "/" for d in RUN_DIRS if (out / d).is_dir() and any((out / d).iterdir())]
    if not found:
        return None
    steps = _steps_logged(out / "metrics.jsonl")
    return ", ".join(found) + (f"; {steps} step(s) logged" if steps else "")


def _steps_logged(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def check_out(cfg: TrainConfig, restarted: bool = False) -> None:
    """Refuse to start a new run over an existing one. A torchrun restart (`restarted`) of
    this same run is not a new run: it may meet its own files."""
    for flag, folder in (("--out", cfg.out), ("--checkpoint-dir", cfg.checkpoint_dir)):
        if folder:
            _check_writable(flag, Path(folder))
    if restarted:
        return
    if cfg.out and not cfg.resume and not cfg.overwrite:
        held = run_in(cfg.out)
        if held:
            raise ConfigError(
                f"--out {cfg.out} holds a run ({held}); continue it with --resume "
                f"{Path(cfg.out) / 'checkpoints'}, replace it with --overwrite, or choose "
                "another --out"
            )
    if cfg.checkpoint_dir and not cfg.resume and not cfg.overwrite:
        root = Path(cfg.checkpoint_dir)
        if root.is_dir() and any(root.glob("step-*")):
            raise ConfigError(
                f"--checkpoint-dir {root} holds another run's checkpoints; continue it with "
                f"--resume {root}, replace them with --overwrite, or choose another folder"
            )
    if cfg.resume and Path(cfg.resume).exists() and not Path(cfg.resume).is_dir():
        raise ConfigError(
            f"--resume {cfg.resume}: not a folder (give the checkpoint folder, e.g. "
            "OUT/checkpoints)"
        )


def _check_writable(flag: str, folder: Path) -> None:
    """A folder the run cannot write (read-only file system, permissions) is refused before
    anything trains: otherwise rank 0 fails at its first write and the others at the next
    collective."""
    target = folder
    while not target.exists() and target != target.parent:
        target = target.parent
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{flag} {folder}: {target} is a file, not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{flag} {folder}: cannot write into {target} (read-only or no permission)"
        )


def clear_run(cfg: TrainConfig) -> list[Path]:
    """--overwrite: remove what an earlier run wrote into --out (and --checkpoint-dir), and
    nothing else the folder holds; returns what was removed."""
    removed: list[Path] = []
    roots = [Path(cfg.out)] if cfg.out else []
    for out in roots:
        paths = [out / n for n in RUN_FILES] + [out / d for d in RUN_DIRS]
        paths += [p for g in RUN_GLOBS for p in out.glob(g)]
        removed += [p for p in paths if p.exists()]
    if cfg.checkpoint_dir:
        root = Path(cfg.checkpoint_dir)
        removed += sorted(root.glob("step-*")) + [p for p in [root / "latest"] if p.exists()]
    for p in removed:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    return removed


# ------------------------------------------------------------------------ segments of a run


def fingerprint(path: str | os.PathLike) -> str:
    """The manifest's content hash: a resume on an edited manifest trains other samples
    under the same step numbers. SHA-256 in 1 MiB chunks (a manifest of a million samples
    is ~200 MB: under a second)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError as e:
        raise ConfigError(f"--data {path}: cannot read it ({e.strerror or e})") from None
    return h.hexdigest()


def order_of(cfg: TrainConfig) -> dict:
    """The settings that decide which samples each step trains, with the data by content."""
    order = {name: getattr(cfg, name) for name in ORDER_FIELDS}
    order["data"] = os.path.abspath(cfg.data)
    order["data_sha256"] = fingerprint(cfg.data)
    return order


def changed_order(before: dict, now: dict) -> list[str]:
    """What a resume would change of the data order, as `key: old -> new`."""
    out = []
    for key in sorted(set(before) | set(now)):
        if key == "data" and before.get("data_sha256") == now.get("data_sha256"):
            continue  # the same manifest, moved: the order is the same
        if before.get(key) != now.get(key):
            if key == "data_sha256":
                out.append("the manifest's content changed")
            else:
                out.append(f"{key} {before.get(key)} -> {now.get(key)}")
    return out


def segments_of(out: str | os.PathLike) -> list[dict]:
    """The segments config.json records (a run written before segments: none)."""
    path = Path(out) / "config.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return []
    segments = data.get("segments") if isinstance(data, dict) else None
    return segments if isinstance(segments, list) else []


def check_resume_order(cfg: TrainConfig, order: dict | None = None) -> None:
    """Before launching: refuse a resume whose settings would train other samples at the
    steps still to come than the run's earlier segments did (the ranks check the checkpoint
    itself too; this says it in under a second, naming what changed). `order`: this run's
    `order_of(cfg)` when the caller has it already (it hashes the manifest)."""
    if not (cfg.resume and cfg.out):
        return
    done = [p for p in Path(cfg.resume).glob("step-*") if not p.name.endswith(".tmp")]
    if not done:  # nothing to continue: the run starts over at step 0
        return
    segments = segments_of(cfg.out)
    if not segments or "order" not in segments[-1]:
        return
    changes = changed_order(segments[-1]["order"], order or order_of(cfg))
    if changes:
        raise ConfigError(resume_refusal(Path(cfg.out) / "config.json", changes))


def resume_refusal(where: os.PathLike | str, changes: list[str]) -> str:
    return (
        f"--resume would change which samples the remaining steps train ({'; '.join(changes)}; "
        f"recorded in {where}): resume with the run's settings, or start a new run"
    )


def new_segment(cfg: TrainConfig, start: int, plan: dict, world: int, order: dict) -> dict:
    """config.json's record of one launch: from which step, with which settings."""
    return {
        "start_step": start,
        "steps": cfg.steps,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "order": order,
        "world": world,
        "plan": plan,
        "config": with_absolute_paths(cfg).to_recipe(),
    }


def record_json(
    cfg: TrainConfig, plan: dict, world: int, start: int, out: Path, order: dict
) -> str:
    """config.json after this launch: the run's current config, plan and world, and every
    segment so far (earlier segments a resumed run redid from `start` on are kept: they
    happened, and their logs of steps >= start were dropped)."""
    segments = segments_of(out) if start > 0 else []
    segments.append(new_segment(cfg, start, plan, world, order))
    return RunRecord(with_absolute_paths(cfg), plan, world, segments).to_json()

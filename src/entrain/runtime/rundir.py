"""A run directory over its life: who may write into it, and what each segment trained.

A run directory holds one run. Starting a new run into it would mix two runs' lines in
metrics.jsonl and samples.jsonl and two runs' checkpoints in checkpoints/, so it takes
--resume (continue) or --overwrite (replace). A resumed run is a new segment of the same
run: config.json keeps every segment, and a segment may not change what decides which
samples a step trains (the data, the global batch, the seed, the shuffle, dp, the rules
that drop bad samples), because the data order is a function of those and the step number
alone; changing them mid-epoch would skip or repeat samples without a word.

A run on several nodes needs its run directory to be one folder that every node sees
(`check_shared`): rank 0 writes config.json and the logs, every rank its checkpoint shards.

Torch-free: the launcher checks all of this before starting any process (`check_shared`
takes the collective it needs from its caller).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
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


# ------------------------------------------------------------ one run directory, every node

SHARED_TOKEN = ".entrain-shared-"
"""The name of the token file `check_shared` leaves in a folder for the other nodes to see."""

AllGather = Callable[[list, object], None]
"""torch.distributed.all_gather_object's signature: fills the list with every rank's object."""


def shared_folders(cfg: TrainConfig) -> list[tuple[str, Path]]:
    """The folders every rank of the run writes into, by flag: --out, and the folder
    checkpoints go to when it is not OUT/checkpoints (--checkpoint-dir, else --resume when
    the run checkpoints). A --resume that is only read is left out: it may be read-only."""
    found = [("--out", cfg.out)]
    if cfg.checkpoint_dir:
        found.append(("--checkpoint-dir", cfg.checkpoint_dir))
    elif cfg.resume and (cfg.checkpoint_every or cfg.checkpoint_on_stop):
        found.append(("--resume", cfg.resume))
    out, seen = [], set()
    for flag, folder in found:
        if folder and os.path.abspath(folder) not in seen:
            seen.add(os.path.abspath(folder))
            out.append((flag, Path(os.path.abspath(folder))))
    return out


def check_shared(
    cfg: TrainConfig, rank: int, world: int, all_gather: AllGather, wait_s: float = 5.0
) -> None:
    """Refuse a run whose folders are not the same folder on every node, before any rank
    writes into them: otherwise each node would keep its own part of the logs and of every
    checkpoint (its ranks' shards), and the run would fail later, at a checkpoint or a
    resume, far from the cause.

    Rank 0 writes a token file with a name new to this launch into each folder; then every
    rank looks for it at its own path of the folder (the same path, unless the nodes were
    given different settings). Every rank gets every rank's answer and raises the same
    one-line ConfigError, naming rank 0's folder and a rank that does not see the token.
    Two `all_gather` calls (torch.distributed.all_gather_object, passed in so this module
    stays torch-free); the first also serves as the barrier after the write."""
    folders = shared_folders(cfg)
    if not folders:
        return
    posted = _post_token(folders) if rank == 0 else None
    name, refusal, theirs = _gather(all_gather, world, posted)[0]  # rank 0's: every rank's text
    try:
        if refusal:
            raise ConfigError(refusal)
        # {flag: where this rank looked} for each folder where it does not see the token
        unseen = {flag: str(f / name) for flag, f in folders if not _sees(f / name, wait_s)}
        answers = _gather(all_gather, world, (socket.gethostname(), unseen))
    finally:
        if rank == 0 and name:
            _remove_token(folders, name)
    for flag, folder in theirs:
        missing = [(r, host, looked[flag]) for r, (host, looked) in enumerate(answers)
                   if flag in looked]  # fmt: skip
        if missing:
            r, host, looked = missing[0]
            raise ConfigError(
                _not_shared(flag, folder / name, r, host, Path(looked), len(missing) - 1)
            )


def _gather(all_gather: AllGather, world: int, mine: object) -> list:
    every: list = [None] * world
    all_gather(every, mine)
    return every


def _post_token(folders: list[tuple[str, Path]]) -> tuple[str | None, str | None, list]:
    """Rank 0: the token file in every folder; (its name, None, the folders), or (None, why
    it could not, the folders)."""
    name = SHARED_TOKEN + secrets.token_hex(6)
    for flag, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(f"written by rank 0 on {socket.gethostname()}\n")
        except OSError as e:
            _remove_token(folders, name)
            why = f"{flag} {folder}: rank 0 cannot write into it ({e.strerror or e})"
            return None, why, folders
    return name, None, folders


def _remove_token(folders: list[tuple[str, Path]], name: str) -> None:
    for _, folder in folders:
        with contextlib.suppress(OSError):
            (folder / name).unlink(missing_ok=True)


def _sees(path: Path, wait_s: float) -> bool:
    """Whether this rank sees `path`, looking again for up to `wait_s` seconds: a network
    file system may show another client's new file a moment late, and may answer from a
    cache that still says "no such file" (this rank looked for the folder in check_out,
    before rank 0 made it); listing the folder and its parent makes it ask the server."""
    deadline = time.monotonic() + wait_s
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            return False
        for folder in (path.parent.parent, path.parent):
            try:
                os.listdir(folder)
            except OSError:
                pass
        time.sleep(0.1)
    return True


def _not_shared(flag: str, token: Path, rank: int, host: str, theirs: Path, more: int) -> str:
    where = "" if theirs == token else f" (it looked for {theirs})"
    who = f"rank {rank} (host {host})" + (f" and {more} other rank(s)" if more else "")
    return (
        f"{flag} {token.parent} is not shared by every node: {who} "
        f"{'do' if more else 'does'} not see rank 0's {token}{where}; put the run on a file "
        "system every node mounts, at the same path on every node"
    )


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

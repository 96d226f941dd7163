"""Checkpoints with torch.distributed.checkpoint: every rank saves what it holds (its
module's weights, their AdamW state, its RNG), plus the step count; resuming restores them
and continues with the next step's global batch, which the step number alone determines
(the data order is a seeded function of epoch and step), so no sample is trained twice or
skipped.

Written atomically: each checkpoint goes to `step-NNNNNNNN.tmp/` and is renamed only once
every rank has written its part, the metadata is complete and a manifest (`MANIFEST.json`:
every file's size and CRC-32) is written; then `latest` is replaced. A crash mid-write
leaves a `.tmp` folder that is ignored (and removed by the next save), and the previous
checkpoint stays the latest. Weights of one module replicated over data-parallel ranks
share keys; the checkpoint stores them once.

Verified on resume: a checkpoint whose files disagree with its manifest (truncated, missing,
changed bytes) is skipped, saying why, and the newest intact one is loaded. A write that
fails (full disk, read-only folder) stops every rank with the same one-line error and
leaves the previous checkpoint the latest. Both are collectives: the ranks agree on every
outcome, so none is left waiting in a barrier for a peer that gave up.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from entrain.runtime.hf_load import WeightsError

PREFIX = "step-"
MANIFEST = "MANIFEST.json"
_STEP = re.compile(rf"{PREFIX}(\d+)")
_CHUNK = 16 << 20  # bytes read at a time when checksumming: memory stays flat at any size


class CheckpointError(WeightsError):
    """A checkpoint that cannot be written or resumed from. Every rank raises it alike (they
    agree on the outcome first); it derives from WeightsError, which the CLI prints once,
    from rank 0, rather than once per rank."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that could not be written (full disk, read-only or missing folder)."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint of another run layout (ranks, plan, model) than this one."""


def _name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _step(path: Path) -> int | None:
    """The step count in a checkpoint folder's name (None: not a checkpoint's name)."""
    m = _STEP.fullmatch(path.name)
    return int(m.group(1)) if m else None


def _complete(path: Path) -> bool:
    return path.is_dir() and not path.name.endswith(".tmp") and (path / ".metadata").exists()


def _checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders under `root` (written to the end or not), newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _step(p) is not None and p.is_dir()]
    return sorted(found, key=_step, reverse=True)


def latest(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under `root` (None: there is none). Not verified:
    resuming goes through `restore`, which is."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.exists():
        path = root / pointer.read_text(encoding="utf-8").strip()
        if _complete(path):
            return path
    found = [p for p in _checkpoints(root) if _complete(p)]
    return found[0] if found else None


def check_folder(path: str | os.PathLike) -> None:
    """Refuse a checkpoint folder that is a file, before anything is trained (the first save
    would fail with `File exists` otherwise)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise CheckpointError(
            f"{path} is a file: checkpoints are resumed from and saved to a folder "
            "(give --resume or --checkpoint-dir a folder)"
        )


# ------------------------------------------------------------------------------- checksums


def _digest(path: Path) -> tuple[int, int]:
    """A file's size and CRC-32. CRC-32, not SHA-256: it is there to catch truncated, torn
    and flipped bytes, not forgery, and zlib's runs over twice as fast (1.8 against
    0.75 GB/s on one core here); a 7B run's ~85 GB of weights and AdamW state, spread over
    the ranks, is checked in seconds."""
    crc, size = 0, 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
            size += n
    return size, crc


def _files(folder: Path) -> list[str]:
    """Every file a checkpoint folder holds, by relative path, but the manifest."""
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(n for n in names if n != MANIFEST)


def _read_manifest(path: Path) -> dict[str, tuple[int, int]]:
    """A checkpoint's manifest: file -> (bytes, crc32). Raises ValueError when it is not
    one (it lists the metadata, always)."""
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = {str(n): (int(v["bytes"]), int(v["crc32"])) for n, v in data["files"].items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"its {MANIFEST} is unreadable ({type(e).__name__}: {e})") from None
    if ".metadata" not in files:
        raise ValueError(f"its {MANIFEST} does not list .metadata")
    return files


def _check_file(folder: Path, name: str, want: tuple[int, int]) -> str | None:
    """What is wrong with one listed file (None: nothing)."""
    path = folder / name
    try:
        size = path.stat().st_size
        if size != want[0]:
            return f"{name} has {size} bytes, the manifest says {want[0]}"
        if _digest(path)[1] != want[1]:
            return f"{name} does not match its CRC-32 in the manifest (its bytes changed)"
    except FileNotFoundError:
        return f"{name} is missing"
    except OSError as e:
        return f"{name} cannot be read ({e.strerror or e})"
    return None


def _share(names: list[str]) -> list[str]:
    """This rank's part of a list of files to checksum: the ranks split the reading, and
    every file is read once."""
    return names[dist.get_rank() :: dist.get_world_size()]


def _gather(value):
    """Every rank's `value`, in rank order, on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _verify(folder: Path, files: dict[str, tuple[int, int]]) -> str | None:
    """What is wrong with a checkpoint against its manifest (None: it is intact). A
    collective: each rank checks its share of the files, every rank gets the verdict."""
    mine = [p for n in _share(sorted(files)) if (p := _check_file(folder, n, files[n]))]
    problems = sorted(p for part in _gather(mine) for p in part)
    if not problems:
        return None
    more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
    return "; ".join(problems[:2]) + more


# ----------------------------------------------------------------------------------- save


def _reason(e: BaseException, where: Path) -> str:
    """Why a write failed, in words: the OSError's own words when there is one (DCP wraps
    them). torch's zip writer reports a full disk as `unexpected pos 704 vs 598`, with no
    errno: a disk with no room left is then named as the cause."""
    stack: list[BaseException | None] = [e]
    seen: set[int] = set()
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError):
            return x.strerror or str(x)
        if isinstance(x, CheckpointException):
            stack += [exc for exc, _ in x.failures.values()]
        stack += [x.__cause__, x.__context__]
    for folder in (where, *where.parents):
        if folder.exists():
            with contextlib.suppress(OSError):
                if shutil.disk_usage(folder).free < (1 << 20):  # what the failed write left
                    return "No space left on device"
            break
    return _said(e)


def _said(e: BaseException) -> str:
    """An exception in one line, `Type: last line`; DCP's own (a traceback per failed rank)
    by the exception of its first failed rank."""
    inner = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) else e
    text = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {text[-1] if text else ''}"


@dataclass
class _Writing:
    """One save in progress: where it goes, and the collective check after each part that
    can fail on some ranks only, so that all stop together and say the same thing."""

    root: Path
    step: int
    error: str | None = None
    """This rank's reason, once a part failed here."""

    @property
    def tmp(self) -> Path:
        return self.root / f"{_name(self.step)}.tmp"

    @property
    def final(self) -> Path:
        return self.root / _name(self.step)

    def failed(self, e: BaseException) -> None:
        self.error = self.error or _reason(e, self.tmp)

    def agree(self) -> None:
        """Every rank learns whether any failed; then all raise the first rank's reason
        together, once rank 0 has removed the partial checkpoint (`latest` was not touched
        yet). Together: a rank that exits first gets the others killed by torchrun, and
        rank 0, still cleaning up, would be killed before printing the one message."""
        errors = [e for e in _gather(self.error) if e]
        if not errors:
            return
        if dist.get_rank() == 0:
            shutil.rmtree(self.tmp, ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.root / "latest.tmp").unlink(missing_ok=True)
        dist.barrier()
        raise CheckpointWriteError(
            f"cannot write checkpoint {_name(self.step)} to {self.root}: {errors[0]}"
        )


def _write_synced(path: Path, text: str) -> None:
    """Write a small file and flush it to the disk before it is renamed into place."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save(
    root: str | os.PathLike,
    step: int,
    named: dict[str, torch.nn.Parameter],
    opt: torch.optim.Optimizer | None,
    layout: dict,
    keep: int = 2,
) -> Path:
    """Save after `step` completed steps (a collective: every rank calls it). Raises
    CheckpointWriteError on every rank when any rank's write fails."""
    w = _Writing(Path(root), step)
    rank = dist.get_rank()
    if rank == 0:
        try:
            w.root.mkdir(parents=True, exist_ok=True)
            for stale in w.root.glob(f"{PREFIX}*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
        except OSError as e:
            w.failed(e)
    w.agree()
    state = _state(named, opt, rank)
    state["train.step"] = step
    state["train.layout"] = json.dumps(layout, sort_keys=True)  # a string: DCP flattens dicts
    try:
        dcp.save(state, checkpoint_id=w.tmp)
    except (OSError, RuntimeError, CheckpointException) as e:  # DCP raises on every rank
        w.failed(e)
    w.agree()
    listing: list = [[]]  # rank 0 lists the files once; every rank checksums its share
    if rank == 0:
        try:
            listing = [_files(w.tmp)]
        except OSError as e:
            w.failed(e)
    dist.broadcast_object_list(listing, src=0)
    sums: dict[str, tuple[int, int]] = {}
    try:
        sums = {n: _digest(w.tmp / n) for n in _share(listing[0])}
    except OSError as e:
        w.failed(e)
    parts = _gather(sums)
    w.agree()
    if rank == 0:
        try:
            _publish(w, {n: s for part in parts for n, s in part.items()})
        except OSError as e:
            w.failed(e)
    w.agree()
    if rank == 0:
        _prune(w.root, step, keep)
    dist.barrier()
    return w.final


def _publish(w: _Writing, sums: dict[str, tuple[int, int]]) -> None:
    """Rank 0: the manifest, then the new `latest` beside the old one, then the renames.
    Whatever needs room on the disk is written before anything is renamed, so a full disk
    leaves the previous checkpoint the latest."""
    files = {n: {"bytes": s, "crc32": c} for n, (s, c) in sorted(sums.items())}
    manifest = {"format": 1, "step": w.step, "checksum": "crc32", "files": files}
    _write_synced(w.tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    pointer = w.root / "latest.tmp"
    _write_synced(pointer, w.final.name + "\n")
    if w.final.exists():  # left by an attempt that was resumed from an earlier checkpoint
        shutil.rmtree(w.final)
    os.replace(w.tmp, w.final)
    os.replace(pointer, w.root / "latest")


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the `keep` newest complete checkpoints up to `step`; those after it were written
    by an attempt whose later steps are being redone (one of them was skipped on resume as
    not intact), and go too: otherwise they would count as the newest and the checkpoint
    just written could be the one removed."""
    found = _checkpoints(root)
    stale = [p for p in found if _step(p) > step]
    kept = [p for p in found if _step(p) <= step and _complete(p)]
    for old in stale + kept[keep:]:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------- load


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


def load(
    path: str | os.PathLike,
    named: dict[str, torch.nn.Parameter],
    opt: torch.optim.Optimizer | None,
    layout: dict,
) -> int:
    """Restore this rank's part of a checkpoint in place; returns the completed steps. Not
    verified: `restore` verifies, then calls it."""
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
        changed = _differences(head["train.layout"], layout)
        raise CheckpointMismatch(
            f"{path} was written by another run layout ({changed}); resume with the same "
            "model, ranks, plan and data order"
        )
    state = _state(named, opt, rank)
    dcp.load(state, checkpoint_id=Path(path))
    torch.set_rng_state(state[f"rng.rank{rank}"])
    return int(head["train.step"])


def _differences(saved: str, layout: dict) -> str:
    """What differs between a checkpoint's layout and this run's, as `key: old -> new`
    (nested keys dotted), so the message names the setting to change back."""
    try:
        before = json.loads(saved)
    except json.JSONDecodeError:
        return f"saved: {saved!r}"
    out: list[str] = []

    def walk(a, b, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix.rstrip('.')}: {a} -> {b}")

    walk(before, json.loads(json.dumps(layout)), "")
    return "; ".join(out) or "same keys, other encoding"


@dataclass
class Restored:
    """What `restore` resumed from."""

    path: Path | None
    """The checkpoint loaded (None: there was none yet)."""
    steps: int
    """Steps it had completed: the first step to run."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """Newer checkpoints passed over, and why, newest first."""
    verified: bool = True
    """False: it has no manifest (written before checkpoints had one) and was loaded on
    trust, no verified one being intact."""

    def notes(self) -> list[str]:
        """One line per checkpoint passed over, and one if the loaded one was unverified."""
        assert self.path is not None
        root, name = self.path.parent, self.path.name
        lines = [f"{root / s}: {why}; resuming from {name} instead" for s, why in self.skipped]
        if not self.verified:
            lines.append(f"{self.path} has no {MANIFEST} to verify it against: loaded as is")
        return lines


def _survey(root: Path) -> list[tuple[str, dict | None, str | None]]:
    """Rank 0: each checkpoint under `root`, newest first, with its manifest (None: it has
    none) or what makes it unusable before reading its data."""
    out: list[tuple[str, dict | None, str | None]] = []
    for path in _checkpoints(root):
        if not (path / MANIFEST).exists():
            bare = None if (path / ".metadata").exists() else "incomplete: it has no .metadata"
            out.append((path.name, None, bare))
            continue
        try:
            out.append((path.name, _read_manifest(path), None))
        except ValueError as e:
            out.append((path.name, None, str(e)))
    return out


def _try_load(path: Path, named, opt, layout: dict) -> tuple[int, str | None]:
    """Load `path` on every rank; the steps done, or why it failed on some rank. A
    checkpoint of another layout stops the run (an older one is no better)."""
    steps, error = -1, None
    try:
        steps = load(path, named, opt, layout)
    except CheckpointMismatch:
        raise
    except (Exception, CheckpointException) as e:  # DCP raises its own on every rank
        error = f"it could not be loaded ({_said(e)})"
    errors = [x for x in _gather(error) if x]
    return steps, errors[0] if errors else None


def restore(
    root: str | os.PathLike,
    named: dict[str, torch.nn.Parameter],
    opt: torch.optim.Optimizer | None,
    layout: dict,
) -> Restored:
    """Load the newest intact checkpoint under `root` (a collective). Checkpoints that fail
    verification or loading are skipped, newest first; one without a manifest is loaded
    only when no verified one is intact. Raises CheckpointError when none can be loaded."""
    root = Path(root)
    check_folder(root)
    survey = [_survey(root) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(survey, src=0)
    skipped: list[tuple[str, str]] = []
    bare: list[str] = []
    for name, files, problem in survey[0]:
        if files is None and problem is None:
            bare.append(name)  # unverifiable: the last resort
            continue
        problem = problem or _verify(root / name, files)
        if problem is None:
            steps, problem = _try_load(root / name, named, opt, layout)
            if problem is None:
                return Restored(root / name, steps, skipped)
        skipped.append((name, problem))
    for name in bare:
        steps, problem = _try_load(root / name, named, opt, layout)
        if problem is None:
            return Restored(root / name, steps, skipped, verified=False)
        skipped.append((name, problem))
    if skipped:
        why = "; ".join(f"{name}: {problem}" for name, problem in skipped)
        raise CheckpointError(
            f"no intact checkpoint in {root} to resume from ({why}); to start afresh, move "
            "the folder aside"
        )
    return Restored(None, 0)

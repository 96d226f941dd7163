"""Checkpoint integrity (issue 19): a manifest of every file's size and CRC-32, resume that
skips a damaged checkpoint for the newest intact one, and saves that fail (full disk,
read-only folder) with one line on every rank and the last good checkpoint kept.

Most tests run DCP in this process (gloo, world size 1); one spawns two ranks to show that
both stop with the same line when only one cannot write; one goes through `entrain train`."""

from __future__ import annotations

import datetime
import errno
import glob
import json
import os
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint.filesystem as dcp_fs
import torch.multiprocessing as mp
from runtime_helpers import train

from entrain.runtime import checkpoint
from entrain.runtime.checkpoint import CheckpointError, CheckpointWriteError
from entrain.runtime.demo_data import make_demo_data

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = {"model": "linear", "world": 1}


@pytest.fixture()
def group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model(
    seed: int, width: int = 8
) -> tuple[dict[str, torch.nn.Parameter], torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = torch.nn.Linear(width, 4)
    return dict(m.named_parameters()), torch.optim.AdamW(m.parameters(), lr=0.1)


def _train(named, opt, steps: int) -> None:
    for _ in range(steps):
        loss = sum((p * torch.randn_like(p)).sum() for p in named.values())
        loss.backward()
        opt.step()
        opt.zero_grad()


def _snapshot(named, opt) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in named.items()}
    for n, p in named.items():
        out |= {f"{n}.{k}": v.clone() for k, v in opt.state[p].items()}
    return out


def _saved_twice(root: Path, keep: int = 2) -> dict[int, dict[str, torch.Tensor]]:
    """Checkpoints after steps 2 and 4 of a small model; what each holds."""
    named, opt = _model(0)
    held = {}
    for step in (2, 4):
        _train(named, opt, 2)
        checkpoint.save(root, step, named, opt, LAYOUT, keep)
        held[step] = _snapshot(named, opt)
    return held


def _restore(root: Path):
    named, opt = _model(1)  # other weights: only a load makes them equal
    found = checkpoint.restore(root, named, opt, LAYOUT)
    return found, _snapshot(named, opt)


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------- manifest


def test_the_manifest_lists_every_file_with_its_size_and_crc32(group, tmp_path):
    _saved_twice(tmp_path)
    folder = tmp_path / "step-00000004"
    manifest = json.loads((folder / "MANIFEST.json").read_text())
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != "MANIFEST.json")
    assert sorted(manifest["files"]) == on_disk and ".metadata" in on_disk
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "crc32": zlib.crc32(data)}, name
    assert (tmp_path / "latest").read_text().strip() == "step-00000004"


# ---------------------------------------------------------------------- resume after damage


def _truncate(f: Path) -> str:
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[: size // 2])
    return f"__0_0.distcp has {size // 2} bytes, the manifest says {size}"


def _delete(f: Path) -> str:
    f.unlink()
    return "__0_0.distcp is missing"


def _flip(f: Path) -> str:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    return "__0_0.distcp does not match its CRC-32 in the manifest (its bytes changed)"


@pytest.mark.parametrize("damage", [_truncate, _delete, _flip], ids=lambda f: f.__name__[1:])
def test_resume_skips_a_damaged_checkpoint_for_the_newest_intact_one(group, tmp_path, damage):
    held = _saved_twice(tmp_path)
    found, _ = _restore(tmp_path)
    assert found.path == tmp_path / "step-00000004", "undamaged, the newest is the one loaded"
    why = damage(tmp_path / "step-00000004" / "__0_0.distcp")
    found, got = _restore(tmp_path)
    assert found.path == tmp_path / "step-00000002" and found.steps == 2
    assert found.notes() == [
        f"{tmp_path / 'step-00000004'}: {why}; resuming from step-00000002 instead"
    ]
    _assert_same(got, held[2])


def test_no_intact_checkpoint_is_one_error_naming_the_folder(group, tmp_path):
    _saved_twice(tmp_path)
    for step in ("step-00000002", "step-00000004"):
        _truncate(tmp_path / step / "__0_0.distcp")
    with pytest.raises(CheckpointError) as e:
        _restore(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"no intact checkpoint in {tmp_path} to resume from (step-00000004: ")
    assert "step-00000002: __0_0.distcp has" in msg and "\n" not in msg


def test_checkpoints_without_a_manifest_are_loaded_as_is_and_said_so(group, tmp_path):
    """Written before checkpoints had a manifest: the newest one that DCP can load is used,
    with a note; a truncated one fails to load and is skipped like a damaged one."""
    held = _saved_twice(tmp_path)
    for step in ("step-00000002", "step-00000004"):
        (tmp_path / step / "MANIFEST.json").unlink()
    found, got = _restore(tmp_path)
    assert found.path.name == "step-00000004" and not found.verified
    assert found.notes() == [
        f"{found.path} has no MANIFEST.json to verify it against: loaded as is"
    ]
    _assert_same(got, held[4])
    _truncate(tmp_path / "step-00000004" / "__0_0.distcp")
    found, got = _restore(tmp_path)
    assert found.path.name == "step-00000002" and not found.verified
    assert found.skipped[0][0] == "step-00000004"
    assert found.skipped[0][1].startswith("it could not be loaded (")
    _assert_same(got, held[2])  # what the failed load wrote first is overwritten


def test_saving_after_a_fallback_drops_the_newer_damaged_checkpoint(group, tmp_path):
    """With --keep-checkpoints 1, the damaged newer checkpoint must not count as the one to
    keep: the checkpoint just written would be the one removed."""
    _saved_twice(tmp_path)
    _flip(tmp_path / "step-00000004" / "__0_0.distcp")
    named, opt = _model(1)
    assert checkpoint.restore(tmp_path, named, opt, LAYOUT).steps == 2
    _train(named, opt, 1)
    checkpoint.save(tmp_path, 3, named, opt, LAYOUT, keep=1)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000003"]
    assert checkpoint.restore(tmp_path, *_model(2), LAYOUT).steps == 3


def test_a_file_as_the_checkpoint_folder_is_refused(group, tmp_path):
    f = tmp_path / "ckpt"
    f.write_text("not a folder\n")
    with pytest.raises(CheckpointError, match="is a file: checkpoints are resumed from"):
        _restore(f)


# -------------------------------------------------------------------------- failed writes


def _to_dev_full(monkeypatch) -> None:
    """Every DCP data file is written to /dev/full: the writes fail with ENOSPC."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    real = dcp_fs.FileSystem.create_stream

    def create_stream(self, path, mode):
        full = "w" in mode and str(path).endswith(".distcp")
        return real(self, "/dev/full" if full else path, mode)

    monkeypatch.setattr(dcp_fs.FileSystem, "create_stream", create_stream)


def _assert_kept_step_2(root: Path) -> None:
    assert (root / "latest").read_text().strip() == "step-00000002"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002"]


def test_a_full_disk_fails_the_save_in_one_line_and_keeps_the_last_checkpoint(
    group, tmp_path, monkeypatch
):
    named, opt = _model(0)
    checkpoint.save(tmp_path, 2, named, opt, LAYOUT)
    _to_dev_full(monkeypatch)
    with pytest.raises(CheckpointWriteError) as e:
        checkpoint.save(tmp_path, 4, named, opt, LAYOUT)
    assert str(e.value) == (
        f"cannot write checkpoint step-00000004 to {tmp_path}: No space left on device"
    )
    _assert_kept_step_2(tmp_path)  # no step-00000004, no .tmp, `latest` as it was


@pytest.fixture()
def small_disk(tmp_path):
    """A real 256 KiB file system (tmpfs; needs root): the disk fills for real."""
    where = tmp_path / "small"
    where.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)],
                       check=True, capture_output=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_really_full_or_read_only_disk_is_named(group, small_disk, monkeypatch):
    """When the disk fills in the middle of a file, torch's writer says only `unexpected pos
    704 vs 598`; the user is told that there is no space left. A read-only disk is named
    too."""
    named, opt = _model(0, width=1024)  # a 16 KiB weight: written past Python's buffer
    checkpoint.save(small_disk, 2, named, opt, LAYOUT)
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        with pytest.raises(OSError):
            while True:
                f.write(b"\0" * 4096)
        f.truncate(filler.stat().st_size - 12288)  # room for part of the next checkpoint
    raw = []
    reason = checkpoint._reason
    monkeypatch.setattr(checkpoint, "_reason", lambda e, w: raw.append(repr(e)) or reason(e, w))
    with pytest.raises(CheckpointWriteError) as e:
        checkpoint.save(small_disk, 4, named, opt, LAYOUT)
    assert "unexpected pos" in raw[0], "torch said more than it used to: simplify _reason?"
    assert str(e.value).endswith(f"to {small_disk}: No space left on device")
    filler.unlink()
    _assert_kept_step_2(small_disk)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with pytest.raises(CheckpointWriteError) as e:
        checkpoint.save(small_disk, 4, named, opt, LAYOUT)
    assert str(e.value).endswith(f"to {small_disk}: Read-only file system")
    _assert_kept_step_2(small_disk)


def _two_ranks_save(rank: int, init: str, root: str, q) -> None:
    """Step 2 saves; at step 4 only rank 1 cannot write (its disk is full); at step 6 only
    rank 0 cannot create the folder (read-only). Each rank reports what it raised."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    named, opt = _model(0)
    checkpoint.save(root, 2, named, opt, LAYOUT)
    mp_ = pytest.MonkeyPatch()
    if rank == 1:
        _to_dev_full(mp_)
    for step in (4, 6):
        try:
            checkpoint.save(root, step, named, opt, LAYOUT)
            q.put((rank, step, "saved"))
        except CheckpointWriteError as e:
            q.put((rank, step, str(e)))
        mp_.undo()
        if rank == 0:
            mp_.setattr(Path, "mkdir", _read_only)
    dist.destroy_process_group()


def _read_only(self: Path, *args, **kwargs) -> None:
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))


def test_every_rank_stops_with_the_same_line_when_one_rank_cannot_write(tmp_path):
    from entrain.cli import _same_on_every_rank

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    root = tmp_path / "ckpt"
    init = f"file://{tmp_path / 'rdzv'}"
    procs = [ctx.Process(target=_two_ranks_save, args=(r, init, str(root), q)) for r in range(2)]
    for p in procs:
        p.start()
    got = {(r, s): m for r, s, m in (q.get(timeout=120) for _ in range(4))}
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    full = f"cannot write checkpoint step-00000004 to {root}: No space left on device"
    ro = f"cannot write checkpoint step-00000006 to {root}: Read-only file system"
    assert got == {(0, 4): full, (1, 4): full, (0, 6): ro, (1, 6): ro}
    _assert_kept_step_2(root)
    assert _same_on_every_rank(CheckpointWriteError(full)), "the CLI would print it per rank"


# ------------------------------------------------------------------------------ end to end


def test_train_resumes_past_a_truncated_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    """`entrain train` for 4 steps checkpointing every 2; the step-4 checkpoint is then
    truncated, and the same command resumes from step 2, says so, and ends with the
    weights of the uninterrupted run, bit for bit."""
    data = make_demo_data(tmp_path / "data", 32, seed=6, audio_share=0.0)
    out, ckpt = tmp_path / "run", tmp_path / "run" / "ckpt"
    args = ("--model", str(ROOT / "benchmarks" / "tiny-vision.yaml"), "--global-batch", "8",
            "--microbatches", "2", "--steps", "4", "--checkpoint-every", "2",
            "--resume", str(ckpt))  # fmt: skip
    train(data, out, 2, *args)
    plain = {k: v for f in glob.glob(str(out / "params-*.pt")) for k, v in torch.load(f).items()}
    assert plain
    for f in glob.glob(str(out / "params-*.pt")):
        os.remove(f)
    why = _truncate(ckpt / "step-00000004" / "__0_0.distcp")
    res = train(data, out, 2, *args)
    said = res.stdout + res.stderr
    assert f"entrain: {ckpt / 'step-00000004'}: {why}; resuming from step-00000002 instead" in said
    assert f"resumed from {ckpt / 'step-00000002'} (2 steps done)" in said
    assert "Traceback" not in said
    resumed = {k: v for f in glob.glob(str(out / "params-*.pt")) for k, v in torch.load(f).items()}
    _assert_same(resumed, plain)

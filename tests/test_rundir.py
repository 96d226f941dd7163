"""Re-running safely: a run directory is never silently overwritten, a resume may not change
which samples the remaining steps train, config.json records each segment, and every
configuration mistake the ranks would meet is refused before launching (one line, fast)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from entrain import cli_train
from entrain.cli import build_parser, main
from entrain.config import ConfigError, TrainConfig
from entrain.runtime.demo_data import make_demo_data
from entrain.runtime.rundir import check_out, clear_run, order_of, record_json, segments_of

ROOT = Path(__file__).resolve().parents[1]
TINY_VISION = str(ROOT / "benchmarks" / "tiny-vision.yaml")
BASE = ("--model", TINY_VISION, "--global-batch", "8", "--microbatches", "2", "--nproc", "2",
        "--timeout", "60")  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("data"), 32, seed=6, audio_share=0.0)


def train(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "entrain", "train", *BASE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def refused(res: subprocess.CompletedProcess, says: str) -> None:
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], res.stderr


def old_run(out: Path, data: Path, **changes) -> TrainConfig:
    """A run directory as a finished 2-step run leaves it, with a checkpoint after step 2."""
    cfg = TrainConfig(data=str(data), model=TINY_VISION, global_batch=8, microbatches=2,
                      steps=2, out=str(out), **changes)  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(record_json(cfg, {"dp": 1}, 2, 0, out, order_of(cfg)))
    (out / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1}\n')
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    return cfg


# ------------------------------------------------------------------ never silently overwritten


def test_a_new_run_into_an_old_runs_folder_is_refused_before_launch(data, tmp_path):
    out = tmp_path / "run"
    old_run(out, data)
    before = (out / "metrics.jsonl").read_bytes()
    res = train("--data", str(data), "--out", str(out), "--steps", "2")
    refused(res, "holds a run (config.json, metrics.jsonl, checkpoints/; 2 step(s) logged)")
    assert (out / "metrics.jsonl").read_bytes() == before


def test_overwrite_removes_the_old_runs_files_and_nothing_else(data, tmp_path):
    out = tmp_path / "run"
    cfg = old_run(out, data)
    (out / "params-llm.pt").write_bytes(b"old")
    (out / "notes.txt").write_text("the user's own")
    removed = clear_run(TrainConfig(**{**cfg.__dict__, "overwrite": True}))
    assert {p.name for p in removed} == {"config.json", "metrics.jsonl", "checkpoints",
                                         "params-llm.pt"}  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_overwrite_and_resume_together_and_a_file_to_resume_from_are_refused(data, tmp_path):
    with pytest.raises(ConfigError, match="give one"):
        TrainConfig(data=str(data), overwrite=True, resume=str(tmp_path))
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        check_out(TrainConfig(data=str(data), resume=str(f), checkpoint_every=1))


def test_an_out_folder_the_run_cannot_write_is_refused(data, tmp_path, monkeypatch):
    real = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != ro and real(p, mode))
    with pytest.raises(ConfigError, match=f"--out {ro / 'run'}: cannot write into {ro}"):
        check_out(TrainConfig(data=str(data), out=str(ro / "run")))
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        check_out(TrainConfig(data=str(data), out=str(tmp_path / "f" / "run")))


def test_a_checkpoint_folder_of_another_run_is_refused(data, tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "step-00000004").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds another run's checkpoints"):
        check_out(TrainConfig(data=str(data), checkpoint_dir=str(ckpt), checkpoint_every=1))
    check_out(TrainConfig(data=str(data), checkpoint_dir=str(ckpt), resume=str(ckpt)))


# ------------------------------------------------------------- a resume keeps the data order


@pytest.mark.parametrize(
    "flags, says",
    [(("--global-batch", "16"), "global_batch 8 -> 16"), (("--seed", "3"), "seed 0 -> 3"),
     (("--no-shuffle",), "shuffle True -> False")],
)  # fmt: skip
def test_a_resume_that_changes_the_data_order_is_refused_before_launch(data, tmp_path, flags,
                                                                       says):  # fmt: skip
    out = tmp_path / "run"
    old_run(out, data)
    args = ["--data", str(data), "--out", str(out), "--steps", "4"]
    res = train(*args, "--resume", str(out / "checkpoints"), *flags)
    refused(res, says)
    assert "--resume would change which samples the remaining steps train" in res.stderr


def test_a_resume_on_an_edited_manifest_is_refused(data, tmp_path):
    copy = tmp_path / "data"
    copy.mkdir()
    for p in data.parent.iterdir():
        (copy / p.name).symlink_to(p)
    (copy / "manifest.jsonl").unlink()
    lines = data.read_text().splitlines()
    (copy / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    old_run(out, copy / "manifest.jsonl")
    (copy / "manifest.jsonl").write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # reordered
    res = train("--data", str(copy / "manifest.jsonl"), "--out", str(out), "--steps", "4",
                "--resume", str(out / "checkpoints"))  # fmt: skip
    refused(res, "the manifest's content changed")


def test_segments_and_a_refused_resume_leaves_config_json_alone(data, tmp_path):
    """End to end: a run, its resume (a second segment), then a resume the checkpoint refuses
    at the ranks (another seed, no config.json to check before launch: --out elsewhere)."""
    out, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoints"
    common = ("--data", str(data), "--out", str(out), "--checkpoint-every", "2")
    assert train(*common, "--steps", "2").returncode == 0
    res = train(*common, "--steps", "3", "--resume", str(ckpt))
    assert res.returncode == 0, res.stderr
    segments = segments_of(out)
    assert [(s["start_step"], s["steps"]) for s in segments] == [(0, 2), (2, 3)]
    before = (out / "config.json").read_bytes()
    other = tmp_path / "other"
    res = train("--data", str(data), "--out", str(other), "--steps", "4", "--resume", str(ckpt),
                "--seed", "5")  # fmt: skip
    assert res.returncode != 0
    assert "another run layout (order.seed: 0 -> 5)" in res.stderr, res.stderr
    assert res.stderr.count("entrain: error:") == 1, res.stderr
    assert (out / "config.json").read_bytes() == before
    assert not (other / "config.json").exists()


# -------------------------------------------------------------------------- caught up front


def test_more_microbatches_than_samples_is_refused_unless_allowed(data):
    with pytest.raises(ConfigError, match="4 microbatch\\(es\\) would be empty"):
        TrainConfig(data=str(data), global_batch=8, dp=2, microbatches=8)
    cfg = TrainConfig(data=str(data), global_batch=8, dp=2, microbatches=8,
                      allow_empty_microbatches=True)  # fmt: skip
    assert cfg.empty_microbatches == 4


@pytest.mark.parametrize(
    "flags, says",
    [(("--data", "DIR"), "a folder, not a manifest file (did you mean"),
     (("--profile", "MANIFEST"), "not a JSON profile"),
     (("--pp", "9"), "use 10 processes"),
     (("--microbatches", "16"), "would be empty"),
     (("--lr", "nan"), "--lr must be a finite number"),
     (("--timeout", "0"), "--timeout must be > 0"),
     (("--timeout", "-1"), "--timeout must be"),
     (("--nproc", "1"), "use 2 processes")],
)  # fmt: skip
def test_mistakes_the_ranks_would_meet_are_one_line_before_launch(data, flags, says):
    flags = tuple(str(data.parent) if f == "DIR" else str(data) if f == "MANIFEST" else f
                  for f in flags)  # fmt: skip
    res = train("--data", str(data), "--steps", "1", *flags)
    refused(res, says)  # one line: no rank started (each would have said it, then torchrun)


# ------------------------------------------------------------------------- fuzz of the flags

FLAG_VALUES = {
    "--global-batch": st.sampled_from(["0", "1", "3", "8", "16", "-2", "x"]),
    "--microbatches": st.sampled_from(["0", "1", "2", "4", "9", "1.5"]),
    "--dp": st.sampled_from(["0", "1", "2", "3"]),
    "--pp": st.sampled_from(["0", "1", "2", "5"]),
    "--lr": st.sampled_from(["0", "1e-3", "-1", "nan", "inf", "abc"]),
    "--steps": st.sampled_from(["0", "1", "5", "-3"]),
    "--warmup-steps": st.sampled_from(["0", "2", "9"]),
    "--timeout": st.sampled_from(["0", "-1", "30", "nan"]),
    "--policy": st.sampled_from(["entrain", "sequential", "bogus"]),
    "--lookahead": st.sampled_from(["auto", "0", "2", "unlimited", "-1"]),
    "--clip-grad": st.sampled_from(["1.0", "none", "0", "-2"]),
    "--encoder-copies": st.sampled_from(["", "vision=2", "vision=0", "audio=2", "x"]),
}
TYPED = {"--global-batch": "global_batch", "--microbatches": "microbatches", "--dp": "dp",
         "--pp": "pp", "--steps": "steps", "--warmup-steps": "warmup_steps",
         "--policy": "policy"}  # fmt: skip


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(st.dictionaries(st.sampled_from(sorted(FLAG_VALUES)), st.none(), max_size=5).flatmap(
    lambda keys: st.fixed_dictionaries({k: FLAG_VALUES[k] for k in keys})),
    st.sampled_from([2, 3, 4]))  # fmt: skip
def test_fuzzed_train_flags_are_refused_in_one_line_or_launch_what_they_say(
    data, monkeypatch, capsys, flags, nproc
):
    launched = []
    monkeypatch.setattr(cli_train, "_launch_torchrun", lambda *a, **k: launched.append(a) or 0)
    argv = ["train", "--model", TINY_VISION, "--data", str(data), "--nproc", str(nproc)]
    for k, v in flags.items():
        argv += [f"{k}={v}"]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own refusal of a malformed value: usage + one line
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rc:
        assert rc == 2 and err.strip(), err
        return
    assert launched, err
    cfg = cli_train.train_config(build_parser().parse_args(argv))
    for flag, field in TYPED.items():
        if flag in flags:
            assert str(getattr(cfg, field)) == flags[flag], flag

"""Shared helpers for the runtime tests: launch `entrain train` and hold its parameters to
the single-process reference."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import torch

from entrain.runtime.reference import reference_params
from entrain.runtime.setup import TrainConfig


def train(manifest: Path, out: Path, nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "entrain",
        "train",
        "--data",
        str(manifest),
        "--out",
        str(out),
        "--nproc",
        str(nproc),
        "--save-params",
        "--timeout",
        "120",
        *args,
    ]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=540, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def params(out: Path) -> dict[str, torch.Tensor]:
    """Every parameter a run saved with --save-params (one file per rank), by name."""
    got: dict[str, torch.Tensor] = {}
    for f in glob.glob(str(out / "params-*.pt")):
        got.update(torch.load(f))
    assert got, f"no params-*.pt in {out}"
    return got


def assert_matches_reference(out: Path, cfg: TrainConfig) -> None:
    grads: dict[str, torch.Tensor] = {}
    ref = reference_params(cfg, grads=grads)
    got = params(out)
    assert set(got) == set(ref)
    # AdamW's first step moves a weight by about lr * g / (|g| + eps): where a reference
    # gradient was nonzero but at rounding level (|g| <= 1e-7) in some step, summing in
    # another order changes the move by a fraction of lr. There the check is within lr / 10
    # per step.
    for name, p in ref.items():
        g = grads.get(name, torch.zeros_like(p))
        tiny = (g.abs() <= 1e-7) & (g != 0)
        assert torch.allclose(got[name][~tiny], p[~tiny], rtol=1e-4, atol=1e-5), name
        assert torch.allclose(got[name][tiny], p[tiny], rtol=0, atol=0.1 * cfg.lr * cfg.steps), name
    # and the step did change the weights (a test that could not fail would pass here too)
    init = reference_params(cfg, steps=0)
    assert any(not torch.equal(init[n], ref[n]) for n in ref)


def read_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of TensorBoard event files, as (step, value) in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}

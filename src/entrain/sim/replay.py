"""Replaying a real training run in the simulator: the check that the simulator predicts the
runtime.

A run directory (`entrain train --out DIR`) holds config.json and metrics.jsonl. For every
recorded step the replay rebuilds the step's global batch, recomputes the assignment exactly
as the runtime did (with the cost model the run balanced with: its profile, or FLOPs), then
simulates that assignment with a measured profile's seconds and compares with the measured
iteration time. Torch-free, like the rest of the analysis side.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from entrain.config import RunRecord, read_run_config
from entrain.cost.emulated import emulated_device, is_emulated
from entrain.cost.profile import Profile, load_profile
from entrain.models.load import run_spec
from entrain.runlog import after_warmup, read_metrics
from entrain.schedule.parallel import ParallelPlan
from entrain.sim.simulator import SimResult, simulate
from entrain.workload.manifest import read_manifest


@dataclass(frozen=True)
class StepReplay:
    step: int
    measured: float
    simulated: float
    measured_busy: dict[str, float]
    simulated_busy: dict[str, float]


@dataclass(frozen=True)
class Replay:
    run: str
    policy: str
    steps: list[StepReplay]
    warmup: int

    @property
    def steady(self) -> list[StepReplay]:
        return after_warmup(self.steps, self.warmup)

    @property
    def measured(self) -> float:
        """Median measured iteration time after the warm-up steps."""
        return statistics.median(s.measured for s in self.steady)

    @property
    def simulated(self) -> float:
        return statistics.median(s.simulated for s in self.steady)

    @property
    def error(self) -> float:
        """(simulated - measured) / measured of the medians."""
        return (self.simulated - self.measured) / self.measured

    def to_dict(self) -> dict:
        return {
            "run": self.run,
            "policy": self.policy,
            "measured_iter_time": self.measured,
            "simulated_iter_time": self.simulated,
            "error": self.error,
            "warmup": self.warmup,
            "steps": [vars(s) for s in self.steps],
        }


def _run_files(run_dir: Path) -> tuple[RunRecord, list[dict]]:
    """The run's config and steps; a note on a last line cut short is left to the caller
    that shows the run (`runs`, `report`), which reads metrics.jsonl first."""
    return read_run_config(run_dir), read_metrics(run_dir, need=("step", "iter_time"))


class RunReplayer:
    """A run's configuration, data and costs, ready to simulate any of its steps as the
    runtime ran it: the same global batch (bad samples the run skipped left out), the same
    assignment (balanced with the cost model the run balanced with: its profile, or FLOPs),
    timed with a measured profile (default: the run's own). A run on an emulated device
    (--device emulate) is timed by default with that device, and its simulated times are
    multiplied by the run's --time-scale, as its sleeps were."""

    def __init__(self, run_dir: str | Path, profile: Profile | str | None = None):
        run_dir = Path(run_dir)
        record, self.rows = _run_files(run_dir)
        self.cfg = cfg = record.config
        self.spec = run_spec(cfg.model, cfg.audio_from, cfg.freeze)
        self.scale = cfg.time_scale if is_emulated(cfg.device) else 1.0
        device = emulated_device(cfg.device, self.spec) if profile is None else None
        if device is not None:  # the device the run emulated: its costs and hardware
            self.timing, self.hw = device.cost_model, device.hardware
        else:
            if profile is None:
                if not cfg.profile:
                    raise ValueError(
                        f"{run_dir} was trained without --profile; pass one (`entrain "
                        "profile`) to give the simulator measured seconds"
                    )
                profile = cfg.profile
            if not isinstance(profile, Profile):
                profile = load_profile(profile)
            profile.check_spec(self.spec)
            self.timing, self.hw = profile.cost_model(), profile.hardware()
        self.balancing = load_profile(cfg.profile).cost_model() if cfg.profile else None
        self.plan = ParallelPlan.from_dict(record.plan)
        workload = read_manifest(cfg.data)
        skipped = run_dir / "skipped.jsonl"
        if skipped.exists():  # the runtime trained without these: its data order skips them
            bad = {json.loads(x)["id"] for x in skipped.read_text(encoding="utf-8").splitlines()}
            workload = workload.take(np.flatnonzero([i not in bad for i in workload.ids]))
        self.workload = workload
        self.recipe = cfg.step_recipe(self.spec, self.balancing).replace(
            dp=self.plan.dp, microbatches=self.plan.microbatches
        )

    def simulate(self, step: int, record_events: bool = False) -> SimResult:
        """Step `step` as the run built it (its step recipe, balanced by the run's own cost
        model), timed by the replay's profile, its messages of the run's wire dtype."""
        sb = self.recipe.step(self.workload, step)
        timed = self.recipe.replace(cost_model=self.timing).cost(sb.samples)
        row = next((r for r in self.rows if r["step"] == step), {})
        wire = 2 if row.get("precision") == "bf16" else 4  # fp32 messages unless bf16
        res = simulate(timed, sb.asg, self.spec, self.plan, self.hw, record_events, wire)
        return res.scaled(self.scale) if self.scale != 1.0 else res


def replay_run(
    run_dir: str | Path, profile: Profile | str | None = None, warmup: int = 2
) -> Replay:
    """Simulate every recorded step of a run with a measured profile (default: the one the
    run trained with)."""
    rp = RunReplayer(run_dir, profile)
    out = []
    for row in rp.rows:
        res = rp.simulate(row["step"])
        out.append(
            StepReplay(
                step=row["step"],
                measured=row["iter_time"],
                simulated=res.iter_time,
                measured_busy=row.get("busy", {}),
                simulated_busy=res.busy,
            )
        )
    return Replay(run=str(run_dir), policy=rp.cfg.policy, steps=out, warmup=warmup)

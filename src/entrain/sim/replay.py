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

from entrain.cost.batch import cost_batch
from entrain.cost.profile import Profile, load_profile
from entrain.models.load import load_spec
from entrain.schedule import assign
from entrain.schedule.parallel import ParallelPlan
from entrain.sim.simulator import simulate
from entrain.workload.columnar import batch_indices
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
        return self.steps[self.warmup :] or self.steps

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


def _run_files(run_dir: Path) -> tuple[dict, list[dict]]:
    cfg_path, metrics_path = run_dir / "config.json", run_dir / "metrics.jsonl"
    for p in (cfg_path, metrics_path):
        if not p.exists():
            raise ValueError(f"{run_dir}: no {p.name} (was it trained with --out {run_dir}?)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        rows = [
            json.loads(x)
            for x in metrics_path.read_text(encoding="utf-8").splitlines()
            if x.strip()
        ]
    except json.JSONDecodeError as e:
        raise ValueError(f"{run_dir}: broken run files ({e})") from None
    if not rows:
        raise ValueError(f"{metrics_path}: no steps recorded")
    return cfg, rows


def replay_run(
    run_dir: str | Path, profile: Profile | str | None = None, warmup: int = 2
) -> Replay:
    """Simulate every recorded step of a run with a measured profile (default: the one the
    run trained with)."""
    run_dir = Path(run_dir)
    cfg, rows = _run_files(run_dir)
    spec = load_spec(cfg["model"])
    if profile is None:
        if not cfg.get("profile"):
            raise ValueError(
                f"{run_dir} was trained without --profile; pass one (`entrain profile`) to "
                "give the simulator measured seconds"
            )
        profile = cfg["profile"]
    if not isinstance(profile, Profile):
        profile = load_profile(profile)
    profile.check_spec(spec)
    timing = profile.cost_model()
    # the assignment must be the runtime's: balanced with the run's own profile, or FLOPs
    balancing = load_profile(cfg["profile"]).cost_model() if cfg.get("profile") else None
    hw = profile.hardware()
    plan = ParallelPlan.from_dict(cfg["plan"])
    workload = read_manifest(cfg["data"])
    out = []
    for row in rows:
        idx = batch_indices(
            len(workload), row["step"], cfg["global_batch"], cfg["seed"], cfg["shuffle"]
        )
        w = workload.take(idx)
        asg = assign(
            cfg["policy"],
            cost_batch(w, spec, balancing),
            plan.dp,
            plan.microbatches,
            cfg["lookahead"],
            cfg["pool"],
        )
        res = simulate(cost_batch(w, spec, timing), asg, spec, plan, hw, "s")
        out.append(
            StepReplay(
                step=row["step"],
                measured=row["iter_time"],
                simulated=res.iter_time,
                measured_busy=row.get("busy", {}),
                simulated_busy=res.busy,
            )
        )
    return Replay(run=str(run_dir), policy=cfg["policy"], steps=out, warmup=warmup)

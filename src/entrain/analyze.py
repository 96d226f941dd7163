"""`entrain analyze`: run every policy on the global batches of a manifest and compare.

Torch-free: it only needs the workload, the cost model and the policies, so a user can see
how uneven their microbatches are on a laptop in seconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from entrain.config import empty_microbatches
from entrain.cost.flops import CostModel, analytic_cost_model
from entrain.models.spec import ModelSpec
from entrain.schedule import POLICIES, evaluate, mean_metrics, work
from entrain.schedule.steps import StepRecipe
from entrain.workload.manifest import ShortManifestError, global_batches


@dataclass(kw_only=True)
class AnalyzeConfig:
    """What to analyze: the parallel shape and which batches and policies."""

    dp: int
    """Data-parallel replicas D."""
    microbatches: int
    """Microbatches per replica per iteration M."""
    global_batch: int
    """Samples per iteration (over all replicas)."""
    iterations: int = 16
    """Global batches to analyze, from the start; 0 means all of them."""
    policies: tuple[str, ...] = tuple(POLICIES)
    """Policies to run; `entrain` is needed for `cv_reduction`."""
    seed: int | None = None
    """Shuffle samples with this seed before batching (as a training epoch would); None
    keeps manifest order."""
    allow_empty_microbatches: bool = False
    """Analyze even when a replica gets fewer samples a batch than microbatches (the empty
    ones count in every cv, which then says more about the shape than about the data)."""

    def __post_init__(self) -> None:
        for name in ("dp", "microbatches", "global_batch"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.iterations < 0:
            raise ValueError(f"--iterations must be >= 0, got {self.iterations}")
        if self.empty_microbatches and not self.allow_empty_microbatches:
            raise ValueError(
                f"--microbatches {self.microbatches}: a replica gets only "
                f"{self.global_batch // self.dp} sample(s) of a global batch of "
                f"{self.global_batch} over {self.dp} replica(s), so "
                f"{self.empty_microbatches} microbatch(es) would be empty and inflate every "
                "cv; use fewer microbatches, a larger global batch, or "
                "--allow-empty-microbatches"
            )
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown:
            raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
        if not self.policies:
            raise ValueError("no policies to run")
        self.policies = tuple(dict.fromkeys(self.policies))

    @property
    def empty_microbatches(self) -> int:
        """Microbatches per replica that get no sample (fewer samples than microbatches)."""
        return empty_microbatches(self.microbatches, self.global_batch, self.dp)


def cv_reduction(policies: dict[str, dict]) -> dict[str, float | None]:
    """worst_cv of each baseline over entrain's (None when entrain's is exactly 0)."""
    if "entrain" not in policies:
        return {}
    ours = policies["entrain"]["worst_cv"]
    out: dict[str, float | None] = {}
    for name, m in policies.items():
        if name == "entrain":
            continue
        if ours > 0:
            out[name] = m["worst_cv"] / ours
        else:
            out[name] = 1.0 if m["worst_cv"] == 0 else None
    return out


def analyze(
    manifest: str | os.PathLike,
    spec: ModelSpec,
    cfg: AnalyzeConfig,
    cost_model: CostModel | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict:
    """The analysis as plain data (what `entrain analyze --json` prints)."""
    model = cost_model or analytic_cost_model(spec)
    recipe = StepRecipe(spec, cfg.global_batch, cfg.dp, cfg.microbatches, cost_model=model)
    rows: dict[str, list] = {p: [] for p in cfg.policies}
    seconds = dict.fromkeys(cfg.policies, 0.0)
    first: dict[str, dict[str, list[float]]] = {}  # per-microbatch work of the first batch
    n_batches = samples = skipped = 0
    for batch in global_batches(manifest, cfg.global_batch, cfg.iterations, cfg.seed, on_progress):
        if len(batch) < cfg.global_batch:
            if not n_batches:  # the shape asked for is not the one a short batch would give
                raise ShortManifestError(manifest, len(batch), cfg.global_batch)
            skipped = len(batch)  # a short tail beside full batches would skew the means
            break
        costed = recipe.cost(batch)
        for p in cfg.policies:
            t0 = time.perf_counter()
            asg = recipe.replace(policy=p).assign(costed)
            seconds[p] += time.perf_counter() - t0
            rows[p].append(evaluate(costed, asg))
            if not n_batches:
                first[p] = {m: w.tolist() for m, w in work(costed, asg).items()}
        n_batches += 1
        samples += len(batch)
    policies = {}
    for p in cfg.policies:
        policies[p] = mean_metrics(rows[p])
        policies[p]["ms_per_batch"] = 1000 * seconds[p] / n_batches
    return {
        "model": spec.name,
        "modules": list(spec.modules),
        "cost_unit": model.unit,
        "config": {k: v for k, v in asdict(cfg).items() if k != "policies"},
        "iterations": n_batches,
        "samples": samples,
        "skipped_tail_samples": skipped,
        "policies": policies,
        "cv_reduction": cv_reduction(policies),
        "first_batch_work": first,
    }

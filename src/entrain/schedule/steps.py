"""The step recipe: for step n of a run, its samples, their costs and the policy's
assignment.

The trainer, the replay simulator, the batch sampler, the planner and `entrain analyze`
all need "what does step n look like". Building it in each of them let the data order and
the assignment knobs drift apart (two seedings of the order once existed side by side), so
they all go through this one object; a replay or an analysis of a run therefore sees the
batches and assignments the run trained on, by construction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from entrain.cost.batch import CostedBatch, cost_batch
from entrain.cost.flops import CostModel
from entrain.models.spec import ModelSpec
from entrain.schedule import assign
from entrain.schedule.assignment import Assignment
from entrain.workload.columnar import Workload, batch_indices


@dataclass(frozen=True)
class StepBatch:
    """One step: the manifest indices of its samples (in batch order), the samples, their
    costs and the assignment (whose sample numbers are positions in `indices`)."""

    step: int
    indices: np.ndarray
    samples: Workload
    batch: CostedBatch
    asg: Assignment


@dataclass(frozen=True)
class StepRecipe:
    """How a run turns its data into steps. `cost_model` None is the analytic FLOPs model;
    a measured profile's model balances in seconds instead."""

    spec: ModelSpec
    global_batch: int
    dp: int
    microbatches: int
    policy: str = "entrain"
    seed: int = 0
    shuffle: bool = True
    lookahead: int | None = None
    pool: int | None = None
    max_deferred_tokens: int | None = None
    cost_model: CostModel | None = None
    order: str = "light-first"

    def replace(self, **changes) -> StepRecipe:
        """The same recipe with some fields changed (another policy, layout or cost model)."""
        return dataclasses.replace(self, **changes)

    def indices(self, n_samples: int, step: int) -> np.ndarray:
        """Manifest indices of step `step` over data of `n_samples`: epochs of a permutation
        seeded by (seed, epoch), whole global batches only."""
        return batch_indices(n_samples, step, self.global_batch, self.seed, self.shuffle)

    def cost(self, samples: Workload) -> CostedBatch:
        return cost_batch(samples, self.spec, self.cost_model)

    def assign(self, batch: CostedBatch) -> Assignment:
        """The policy's assignment of a costed batch (the deferral knobs steer Entrain only;
        the baselines never defer)."""
        return assign(
            self.policy,
            batch,
            self.dp,
            self.microbatches,
            self.lookahead,
            self.pool,
            max_deferred_tokens=self.max_deferred_tokens,
            order=self.order,
        )

    def step(self, workload: Workload, step: int) -> StepBatch:
        """Step `step` of a run over `workload` (the whole data set, in manifest order)."""
        indices = self.indices(len(workload), step)
        samples = workload.take(indices)
        batch = self.cost(samples)
        return StepBatch(step, indices, samples, batch, self.assign(batch))

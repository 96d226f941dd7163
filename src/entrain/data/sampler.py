"""A batch sampler that feeds Entrain's microbatches to a plain PyTorch training loop.

Entrain's runtime is one way to train; many users keep their own loop (DDP, FSDP, a
framework's trainer) and only want its batching. `EntrainBatchSampler` gives them that: put
it into a `DataLoader` as `batch_sampler` and every data-parallel rank gets, per iteration,
the microbatches an Entrain policy assigns to it. No Entrain runtime, process group or
communication is needed: every rank computes the whole iteration's assignment from the
same inputs (manifest sizes, model spec, seed, epoch, step) and keeps its own share, so the
ranks agree without talking.

Two modes, because Entrain's assignment has two halves:

* Coupled (the default). A plain loop runs each sample's encoders in the same microbatch
  as the sample's LLM forward, so it can only execute the LLM half of the assignment
  (`sample_replica`, `sample_mb`); encoder units go with their sample. The LLM work is
  then balanced as the policy balances it, encoder work follows the samples and is not
  balanced separately. (When encoders dominate, policy="joint" balances the coupled
  modules together and may suit such a loop better; coupled baselines such as "joint"
  and "sequential" place units with their samples anyway, so nothing is lost there.)
* Decoupled (`decoupled=True`). The full assignment, for a loop that can move embeddings
  between ranks as Entrain's runtime does: per iteration, this rank's LLM microbatches and,
  per encoder, the units this rank's encoder computes. A unit may belong to a sample of a
  later microbatch or of another rank; the loop must send its embedding there (and its
  gradient back), and hold embeddings that arrive early until their microbatch runs.

Steps come from the runtime's step recipe (schedule/steps.py): epochs of a permutation
seeded by seed and epoch, whole global batches only, so the sampler and `entrain train` with
the same data, seed and global batch see the same samples and assignments in the same steps.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler

from entrain.cost.batch import CostedBatch, unit_locations
from entrain.cost.flops import CostModel
from entrain.cost.profile import load_profile
from entrain.models.load import load_spec
from entrain.models.spec import ModelSpec
from entrain.schedule import POLICIES, check_order
from entrain.schedule.assignment import Assignment
from entrain.schedule.steps import StepBatch, StepRecipe
from entrain.workload.columnar import Workload
from entrain.workload.manifest import read_manifest


@dataclass(frozen=True)
class EncoderUnit:
    """One encoder unit (an image, a group of video frames, an audio chunk) and the LLM
    microbatch that needs its embedding."""

    sample: int
    """Index of the owning sample in the manifest."""
    modality: str
    """"image", "video" or "audio": one encoder may take several modalities."""
    item: int
    """Index of the item in the sample's list of that modality."""
    chunk: int
    """Which unit of the item: a video's frame group or an audio clip's chunk (0 for an
    image)."""
    llm_rank: int
    """Data-parallel rank whose LLM runs the sample: where the embedding must go."""
    llm_microbatch: int
    """The sample's LLM microbatch on that rank; never before the unit's own microbatch."""


@dataclass(frozen=True)
class IterationAssignment:
    """What one data-parallel rank runs in one iteration: what decoupled mode yields, and
    what `EntrainBatchSampler.iteration` returns in either mode."""

    step: int
    """Global step, counted over epochs as `entrain train` counts it."""
    rank: int
    """The data-parallel rank this view is for."""
    llm_microbatches: list[list[int]]
    """Per microbatch, in run order: manifest indices of the samples whose LLM work runs
    here."""
    encoder_microbatches: dict[str, list[list[EncoderUnit]]]
    """Encoder name -> per microbatch, the units this rank's encoder computes then. They
    may feed later microbatches and other ranks (`EncoderUnit.llm_rank/llm_microbatch`).
    Empty in coupled mode, where every unit runs with its sample's LLM microbatch."""


def _default_dp(dp_rank: int | None, dp_size: int | None) -> tuple[int, int]:
    """Rank and world size from torch.distributed when it is running, else one replica."""
    import torch.distributed as dist

    running = dist.is_available() and dist.is_initialized()
    if dp_size is None:
        dp_size = dist.get_world_size() if running else 1
    if dp_rank is None:
        dp_rank = dist.get_rank() if running else 0
    return dp_rank, dp_size


def _check_args(
    global_batch: int,
    microbatches: int,
    dp_rank: int,
    dp_size: int,
    policy: str,
    lookahead: int | None,
    pool: int | None,
    max_deferred_tokens: int | None,
    order: str = "light-first",
) -> None:
    """Raise a ValueError a user can act on for every argument that cannot work."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    for name, value in [
        ("global_batch", global_batch),
        ("microbatches", microbatches),
        ("dp_size", dp_size),
    ]:
        if not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
    if global_batch % dp_size:
        raise ValueError(
            f"global_batch {global_batch} is not divisible by dp_size {dp_size}: every "
            f"replica must get the same number of samples"
        )
    if lookahead is not None and (not isinstance(lookahead, numbers.Integral) or lookahead < 0):
        raise ValueError(
            f"lookahead must be an integer >= 0 (or None: unlimited), got {lookahead!r}; for "
            f"`entrain train --lookahead auto`, pass the depth it chose (1 without a profile)"
        )
    if pool is not None and (not isinstance(pool, numbers.Integral) or pool < 1):
        raise ValueError(f"pool must be an integer >= 1 (or None: all replicas), got {pool!r}")
    if max_deferred_tokens is not None and max_deferred_tokens < 0:
        raise ValueError(
            f"max_deferred_tokens must be >= 0 (or None: no cap), got {max_deferred_tokens}"
        )
    check_order(order)


class EntrainBatchSampler(Sampler[list[int]]):
    """Per iteration and data-parallel rank, the microbatches an Entrain policy assigns.

    Coupled mode (default) yields lists of manifest indices, one microbatch at a time:
    `microbatches` of them per iteration, in the order they run, so
    `DataLoader(dataset, batch_sampler=sampler, collate_fn=...)` gives microbatches and the
    loop steps the optimizer after every `microbatches` of them. Only the policy's LLM
    placement is used; each sample's encoder units run with it (see the module docstring).
    Microbatches differ in size by design (they are balanced by cost, not by count), so
    normalize the loss by the target count of the iteration, not per microbatch. A replica
    with fewer samples than microbatches gets empty lists (collate_fn must accept them).

    Decoupled mode (`decoupled=True`) yields one `IterationAssignment` per iteration: this
    rank's LLM microbatches and the encoder units it computes, which the loop must route to
    their samples' ranks and microbatches as Entrain's runtime does.

    `len()` counts what one epoch yields: iterations x microbatches (coupled) or
    iterations (decoupled). Samples that do not fill a whole global batch at the end of an
    epoch are dropped, as the runtime drops them; with shuffling, they differ per epoch.
    Call `set_epoch` before each epoch, as with `DistributedSampler`.
    """

    def __init__(
        self,
        manifest_or_workload: str | os.PathLike | Workload,
        model: str | os.PathLike | ModelSpec = "tiny",
        *,
        global_batch: int,
        microbatches: int,
        dp_rank: int | None = None,
        dp_size: int | None = None,
        policy: str = "entrain",
        seed: int = 0,
        shuffle: bool = True,
        lookahead: int | None = None,
        pool: int | None = None,
        max_deferred_tokens: int | None = None,
        order: str = "light-first",
        profile: str | os.PathLike | None = None,
        decoupled: bool = False,
        epoch: int = 0,
    ):
        """`model` is a preset name, a spec file or a ModelSpec: its encoders decide the
        units and their costs. `dp_rank`/`dp_size` default to torch.distributed's rank and
        world size when a process group is initialized (else 0 and 1); pass them when data
        parallelism is not the whole world (tensor or pipeline parallel groups). `lookahead`,
        `pool`, `max_deferred_tokens` and `order` are the Entrain policy's knobs (`assign`);
        pass the values `entrain train` uses to reproduce its assignment (its default
        lookahead, "auto", is 1 without a profile). `profile` is a measured profile
        (`entrain profile`): balance measured seconds instead of FLOPs."""
        dp_rank, dp_size = _default_dp(dp_rank, dp_size)
        _check_args(
            global_batch,
            microbatches,
            dp_rank,
            dp_size,
            policy,
            lookahead,
            pool,
            max_deferred_tokens,
            order,
        )
        self.workload = (
            manifest_or_workload
            if isinstance(manifest_or_workload, Workload)
            else read_manifest(manifest_or_workload)
        )
        self.spec = model if isinstance(model, ModelSpec) else load_spec(model)
        cost_model: CostModel | None = None
        if profile is not None:
            cost_model = load_profile(profile, self.spec).cost_model()
        if len(self.workload) < global_batch:
            raise ValueError(
                f"the data has {len(self.workload)} samples, fewer than one global batch "
                f"({global_batch})"
            )
        self.global_batch, self.microbatches = global_batch, microbatches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.recipe = StepRecipe(
            self.spec,
            global_batch,
            dp_size,
            microbatches,
            policy,
            seed,
            shuffle,
            lookahead,
            pool,
            max_deferred_tokens,
            cost_model,
            order,
        )
        self.decoupled = decoupled
        self.epoch = epoch
        # Every rank's view of a step derives from one assignment; keep the latest so that
        # asking for several ranks of one step (to know what arrives from where) is cheap.
        self._last: StepBatch | None = None

    @property
    def iterations(self) -> int:
        """Iterations (optimizer steps) per epoch: whole global batches only."""
        return len(self.workload) // self.global_batch

    def set_epoch(self, epoch: int) -> None:
        """Use epoch `epoch`'s order (each epoch is a new seeded permutation)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.iterations * (1 if self.decoupled else self.microbatches)

    def __iter__(self) -> Iterator:
        for i in range(self.iterations):
            it = self.iteration(i)
            if self.decoupled:
                yield it
            else:
                yield from it.llm_microbatches

    def step_of(self, i: int) -> int:
        """Global step of iteration `i` of the current epoch (how `entrain train` counts)."""
        if not 0 <= i < self.iterations:
            raise ValueError(f"iteration must be in [0, {self.iterations}), got {i}")
        return self.epoch * self.iterations + i

    def assignment(self, i: int) -> tuple[np.ndarray, CostedBatch, Assignment]:
        """Iteration `i` of the current epoch: the manifest indices of its global batch, the
        batch with its costs, and the policy's assignment (batch-local sample numbers)."""
        p = self._planned(i)
        return p.indices, p.batch, p.asg

    def _planned(self, i: int) -> StepBatch:
        step = self.step_of(i)
        if self._last is None or self._last.step != step:
            self._last = self.recipe.step(self.workload, step)
        return self._last

    def iteration(self, i: int, rank: int | None = None) -> IterationAssignment:
        """What `rank` (default: this sampler's) runs in iteration `i` of the current epoch.
        Another rank's view tells a decoupled loop which embeddings it will receive."""
        rank = self.dp_rank if rank is None else rank
        if not 0 <= rank < self.dp_size:
            raise ValueError(f"rank must be in [0, dp_size={self.dp_size}), got {rank}")
        p = self._planned(i)
        indices, asg = p.indices, p.asg
        M = self.microbatches
        mine = np.flatnonzero(asg.sample_replica == rank)  # ascending: batch order
        llm = [indices[mine[asg.sample_mb[mine] == k]].tolist() for k in range(M)]
        encoders: dict[str, list[list[EncoderUnit]]] = {}
        if self.decoupled:
            for enc in self.spec.encoders:
                encoders[enc.name] = self._encoder_view(enc, p, rank)
        return IterationAssignment(
            step=self.step_of(i), rank=rank, llm_microbatches=llm, encoder_microbatches=encoders
        )

    def _encoder_view(self, enc, p: StepBatch, rank: int) -> list[list[EncoderUnit]]:
        """Per microbatch, the units of `enc` that `rank` computes, in unit order."""
        indices, asg, table = p.indices, p.asg, p.batch.units[enc.name]
        modality, item, chunk = unit_locations(enc, p.samples, table)
        out: list[list[EncoderUnit]] = [[] for _ in range(self.microbatches)]
        for u in np.flatnonzero(asg.unit_replica[enc.name] == rank).tolist():
            s = int(table.sample[u])
            out[int(asg.unit_mb[enc.name][u])].append(
                EncoderUnit(
                    sample=int(indices[s]),
                    modality=str(modality[u]),
                    item=int(item[u]),
                    chunk=int(chunk[u]),
                    llm_rank=int(asg.sample_replica[s]),
                    llm_microbatch=int(asg.sample_mb[s]),
                )
            )
        return out

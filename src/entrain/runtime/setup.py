"""What the trainer and the single-process reference share: the config, the data, the
modules of a role, and the inputs of a unit."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from entrain.config import TrainConfig, copies_of
from entrain.cost.batch import CostedBatch
from entrain.cost.flops import CostModel
from entrain.cost.profile import Profile, load_profile
from entrain.data.chat import ChatError, tokens_of
from entrain.data.codec import TextCodec
from entrain.data.sequence import LayoutError, SampleTokens, workload_items
from entrain.models.load import run_spec
from entrain.models.spec import ModelSpec, VisionSpec
from entrain.program.iteration import IterationPlan
from entrain.runtime.inputs import Record, SampleError, load_records
from entrain.runtime.loader import Job, Key, Loader
from entrain.runtime.source import HFSource, PresetSource, model_source
from entrain.schedule.assignment import Assignment
from entrain.schedule.parallel import ParallelPlan
from entrain.workload.columnar import Workload, batch_indices
from entrain.workload.manifest import read_manifest

__all__ = ["Dataset", "SampleInputs", "Step", "TrainConfig", "make_step", "open_dataset"]


def run_layout(cfg: TrainConfig, encoders: list[str], world: int) -> ParallelPlan:
    """The run's parallel plan for `world` processes: per replica, each encoder's copies,
    then the LLM's stages (--pp, default: the ranks left); one clear error when the
    processes cannot hold it."""
    copies = copies_of(cfg.encoder_copies)
    unknown = sorted(set(copies) - set(encoders))
    if unknown:
        raise ValueError(
            f"--encoder-copies names {', '.join(unknown)}, which the model has no encoder "
            f"for (its encoders: {', '.join(encoders) or 'none'})"
        )
    enc_ranks = sum(copies.get(e, 1) for e in encoders)
    per_replica, rest = divmod(world, cfg.dp)
    pp = cfg.pp or per_replica - enc_ranks
    if rest or pp < 1 or per_replica != enc_ranks + pp:
        what = " + ".join(f"{copies.get(e, 1)} {e}" for e in encoders) or "no encoders"
        raise ValueError(
            f"{world} processes cannot hold dp={cfg.dp} replicas of [{what}] + {pp} LLM "
            f"stage(s); use {cfg.dp * (enc_ranks + max(pp, 1))} processes"
        )
    return ParallelPlan(
        dp=cfg.dp,
        llm_pp=pp,
        microbatches=cfg.microbatches,
        encoder_tp={e: 1 for e in encoders},
        encoder_dp={e: n for e, n in copies.items() if n > 1},
    )


class Dataset:
    """Records, their columnar sizes and their token sequences (built once, checked against
    the manifest's `text_tokens`); unit inputs on demand, cached. `drop` leaves samples out
    by their manifest index (bad samples under --skip-bad); `parsed` is the manifest's
    (records, workload) when the caller has read it already."""

    def __init__(
        self,
        path: str | Path,
        spec: ModelSpec,
        codec: TextCodec,
        rope: str = "1d",
        drop: Collection[int] = (),
        parsed: tuple[list[Record], Workload] | None = None,
        cache_bytes: int | None = None,
        workers: int = 0,
        video_interval: Callable[[float], float] | None = None,
    ):
        """`video_interval(fps)`: M-RoPE temporal positions per temporal patch of a video
        sampled at `fps` (the source's rule; None: 1)."""
        self.spec = spec
        self.records, self.workload = parsed or (load_records(path), read_manifest(path))
        if drop:
            keep = np.setdiff1d(np.arange(len(self.records)), np.fromiter(drop, np.int64))
            self.records = [self.records[int(i)] for i in keep]
            self.workload = self.workload.take(keep)
        self.codec = codec
        self.loader = Loader(self._job, cache_bytes, workers)
        interval = None
        if video_interval is not None:
            interval = lambda i: video_interval(self.records[i].video_fps)  # noqa: E731
        items = workload_items(self.workload, spec, interval)
        self._tokens: list[SampleTokens] = []
        for rec, its, declared in zip(self.records, items, self.workload.text_tokens.tolist()):
            try:
                tokens = tokens_of(rec.id, rec.text, rec.messages, its, codec, rope)
            except (LayoutError, ChatError) as e:
                raise SampleError(f"{path}:{rec.line}: {e}") from None
            if tokens.text_tokens != declared:
                raise SampleError(
                    f"{path}:{rec.line}: sample {rec.id!r} declares text_tokens={declared} "
                    f"but its text has {tokens.text_tokens} tokens under {codec.name}"
                )
            self._tokens.append(tokens)

    def __len__(self) -> int:
        return len(self.records)

    def batch_order(self, step: int, global_batch: int, seed: int, shuffle: bool) -> np.ndarray:
        """Sample indices of a step: epochs of a seeded permutation, whole batches only."""
        return batch_indices(len(self), step, global_batch, seed, shuffle)

    def tokens(self, index: int) -> SampleTokens:
        return self._tokens[index]

    def inputs(self, index: int, device: torch.device | str = "cpu") -> SampleInputs:
        t = self._tokens[index]
        return SampleInputs(
            torch.from_numpy(t.input_ids).to(device),
            torch.from_numpy(t.labels).to(device),
            torch.from_numpy(t.positions).to(device),
            t.spans,
        )

    def _job(self, key: Key) -> Job:
        modality, index, item = key
        table = self.workload.items[modality]
        row = int(np.searchsorted(table.sample, index)) + item
        rec = self.records[index]
        size = tuple(table.size[row].tolist())
        enc = self.spec.encoder_for(modality)
        return Job(modality, rec.files(modality)[item], size, rec.id, enc)

    def key(self, index: int, ref) -> Key:
        """The cache key of a unit's item."""
        return (ref.modality, index, ref.item)

    def unit_input(self, index: int, ref) -> tuple:
        """A unit's encoder input: (patches, grid) of an image or of one temporal patch of a
        video; (mels, valid positions) of one audio chunk. Torch tensors on the CPU."""
        value = self.loader.get(self.key(index, ref))
        if ref.modality == "image":
            return torch.from_numpy(value[0]), torch.from_numpy(value[1])
        if ref.modality == "video":
            patches, grid = value[ref.chunk]
            return torch.from_numpy(patches), torch.from_numpy(grid)
        mels, valid = value
        return torch.from_numpy(mels[ref.chunk]), valid[ref.chunk]


@dataclass
class SampleInputs:
    """What the LLM stages need of one sample, as tensors on their device."""

    ids: torch.Tensor
    """(L,) token ids, pads where items stand."""
    labels: torch.Tensor
    """(L,) next-token targets, IGNORE where there is no loss."""
    positions: torch.Tensor
    """(1, L) or (3, L) rotary positions."""
    spans: tuple


@dataclass
class Step:
    """One global batch: its samples, costs, assignment and the per-rank plan."""

    indices: np.ndarray
    batch: CostedBatch
    asg: Assignment
    plan: IterationPlan


def make_step(
    data: Dataset,
    cfg: TrainConfig,
    step: int,
    llm_stages: int,
    cost_model: CostModel | None = None,
    value_bytes: int = 4,
    copies: dict[str, int] | None = None,
) -> Step:
    """Step `step`'s samples, costs, assignment and plan (`value_bytes`: of a value on the
    wire, which sizes the transfers)."""
    sb = cfg.step_recipe(data.spec, cost_model).step(data.workload, step)
    plan = IterationPlan.build(
        sb.batch, sb.asg, data.spec, llm_stages, sb.samples, value_bytes, copies
    )
    return Step(sb.indices, sb.batch, sb.asg, plan)


def encode_units(
    tower: nn.Module,
    enc,
    data: Dataset,
    step: Step,
    units: list[int],
    trains: bool,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """Embeddings (or, for a frozen encoder, trunk states) of some units of one encoder,
    computed in one call of the tower on `device` (inputs are decoded and cached on the CPU,
    moved per call)."""
    refs = [step.plan.units[enc.name][u] for u in units]
    parts = [data.unit_input(int(step.indices[r.sample]), r) for r in refs]
    if isinstance(enc, VisionSpec):
        patches = torch.cat([p for p, _ in parts]).to(device)
        grid = torch.cat([g for _, g in parts]).to(device)
        out = tower(patches, grid) if trains else tower.trunk(patches, grid)
        rows = [int(g.prod()) // (enc.merge_size**2 if trains else 1) for _, g in parts]
        return list(torch.split(out, rows))
    chunks = parts
    mels = torch.stack([m for m, _ in chunks]).to(device)
    valid = [v for _, v in chunks]
    return tower(mels, valid) if trains else tower.trunk(mels, valid)


def source_of(cfg: TrainConfig) -> PresetSource | HFSource:
    """Where the run's modules and tokenizer come from (runtime/source.py)."""
    return model_source(
        cfg.model, cfg.seed, cfg.init_from, cfg.audio_from, cfg.freeze, cfg.tokenizer
    )


def spec_of(cfg: TrainConfig) -> ModelSpec:
    return run_spec(cfg.model, cfg.audio_from, cfg.freeze)


def open_dataset(
    cfg: TrainConfig, source, drop: Collection[int] = (), parsed=None, workers: int = 0
) -> Dataset:
    """The run's data set, tokenized by the source's codec; encoder inputs through a cache of
    --cache-mb, decoded ahead by `workers` processes."""
    return Dataset(
        cfg.data,
        source.spec,
        source.codec(),
        source.rope,
        drop,
        parsed,
        cache_bytes=int(cfg.cache_mb * 2**20) if cfg.cache_mb is not None else None,
        workers=workers,
        video_interval=source.video_interval,
    )


def profile_of(cfg: TrainConfig, spec: ModelSpec) -> Profile | None:
    """The run's measured profile, checked against its model (None: the FLOPs model)."""
    return None if cfg.profile is None else load_profile(cfg.profile, spec)


def resolve_lookahead(
    cfg: TrainConfig, data: Dataset, profile: Profile | None, plan: ParallelPlan, batches: int = 3
) -> int | None:
    """The lookahead the run uses. "auto" asks the simulator, with the run's profile, which
    depth is fastest on the first `batches` global batches of the data under the run's plan
    (every rank computes the same answer from the same inputs)."""
    if cfg.lookahead != "auto":
        return cfg.lookahead
    if cfg.policy != "entrain":
        return None  # only entrain defers
    if profile is None:
        return 1
    from entrain.sim.lookahead import choose_lookahead

    recipe = dataclasses.replace(cfg, lookahead=None).step_recipe(data.spec, profile.cost_model())
    n = min(batches, len(data) // cfg.global_batch)
    costed = [recipe.cost(data.workload.take(recipe.indices(len(data), i))) for i in range(n)]
    return choose_lookahead(recipe, costed, plan, profile.hardware())[0]

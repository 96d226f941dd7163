"""What the trainer and the single-process reference share: the config, the data, the
modules of a role, and the inputs of a unit."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from entrain.cost.batch import CostedBatch, cost_batch
from entrain.cost.flops import CostModel
from entrain.cost.profile import Profile, load_profile
from entrain.data.chat import ChatError, tokens_of
from entrain.data.codec import TextCodec
from entrain.data.sequence import LayoutError, SampleTokens, workload_items
from entrain.models.load import run_spec
from entrain.models.spec import ModelSpec, VisionSpec
from entrain.runtime.device import check_device
from entrain.runtime.inputs import Record, SampleError, load_records
from entrain.runtime.iteration import IterationPlan
from entrain.runtime.loader import Job, Key, Loader
from entrain.runtime.optim import SCHEDULES, lr_at
from entrain.runtime.source import HFSource, PresetSource, model_source
from entrain.schedule import assign
from entrain.schedule.assignment import Assignment
from entrain.schedule.parallel import ParallelPlan
from entrain.workload.columnar import Workload, batch_indices
from entrain.workload.manifest import read_manifest


@dataclass(kw_only=True)
class TrainConfig:
    """A training run."""

    data: str
    """Training manifest (sizes, text and files of every sample)."""
    model: str = "tiny"
    """Model preset, spec file, or a Hugging Face model folder (config.json + safetensors)."""
    init_from: str | None = "same"
    """Weights of a model folder: "same" (the --model folder), another folder, or None
    (random weights from --seed; for tests and small models)."""
    audio_from: str | None = None
    """A Whisper model folder whose encoder becomes the audio encoder (a new projector)."""
    freeze: tuple[str, ...] = ()
    """Modules that do not train (vision, audio, llm); a frozen encoder's projector trains."""
    tokenizer: str | None = None
    """Tokenizer folder (default: the model folder's own; presets use the byte tokenizer)."""
    data_workers: int = 1
    """Processes per encoder rank that decode the next step's images, videos and audio
    while this step trains (0: decode on the rank itself, when needed)."""
    cache_mb: float | None = 2048
    """Most megabytes of decoded encoder inputs a rank keeps (least recently used out;
    None: no bound)."""
    policy: str = "entrain"
    """Assignment policy."""
    steps: int = 10
    """Optimizer steps."""
    global_batch: int = 16
    """Samples per step, over all replicas."""
    microbatches: int = 4
    """Microbatches per replica per step."""
    dp: int = 1
    """Data-parallel replicas."""
    pp: int | None = None
    """LLM pipeline stages (default: the ranks left per replica after one per encoder)."""
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay, on matrices only (not on norm scales and biases)."""
    lr_schedule: str = "constant"
    """After warm-up: constant, cosine or linear decay to min_lr_ratio x lr at decay_steps."""
    warmup_steps: int = 0
    """Steps of linear warm-up from lr / warmup_steps to lr."""
    decay_steps: int | None = None
    """Step at which the decay reaches its floor (default: the run's length)."""
    min_lr_ratio: float = 0.0
    """The decay's floor, as a fraction of lr."""
    clip_grad: float | None = 1.0
    """Clip the gradient's global L2 norm over the whole model to this (None: no clipping)."""
    precision: str = "auto"
    """fp32, or bf16 compute (autocast) with fp32 weights and optimizer state, bf16 messages
    between ranks; auto: bf16 on GPUs, fp32 on the CPU."""
    profile_memory: bool = False
    """Measure the last step's peak bytes of live tensors on every rank with torch's memory
    profiler (OUT/memory-RANK.json): what the planner's memory model is held to."""
    encoder_copies: str = ""
    """Encoders on several ranks per replica, e.g. "vision=2": each copy encodes a share of
    every encoder microbatch (split by cost), their gradients summed with the replicas'."""
    shard_optimizer: bool = True
    """ZeRO-1: with dp > 1, each replica of a module keeps the AdamW state of 1/dp of its
    parameters (runtime/optim.py)."""
    recompute: str = "none"
    """Activation recompute per transformer block: none or full for every module, or per
    module, e.g. "vision=full,llm=none" (a module not named: none)."""
    seed: int = 0
    shuffle: bool = True
    """Shuffle the samples every epoch (seeded by seed and epoch)."""
    lookahead: int | None | str = "auto"
    """Entrain: microbatches an encoder may run ahead of the LLM (None: unlimited). A deeper
    run-ahead balances more but delays the encoder's backward until the LLM's backward of a
    later microbatch, and leaves more encoder backwards for the end of the step. "auto":
    with a profile, the depth the simulator finds fastest on the first batches of the
    data; without one, 1 (what the planner picks for trained encoders in most plans)."""
    pool: int | None = None
    """Entrain: replicas whose encoders share units (None: all)."""
    timeout_s: float = 300.0
    """Seconds a rank waits for a message before it fails naming what it waited for."""
    out: str | None = None
    """Directory for metrics.jsonl (and trace.json, params)."""
    trace: bool = False
    """Write a Chrome/Perfetto trace of the last step."""
    save_params: bool = False
    """Write every rank's parameters after the last step (used by the equivalence tests)."""
    pin_cores: bool = False
    """Pin each local rank to its own CPU core (steadier CPU timings)."""
    device: str = "auto"
    """Where ranks compute (runtime/device.py): "cuda" (a GPU per process with NCCL, or
    shared GPUs with messages over gloo when there are fewer), "cpu" (gloo), or "auto": a
    GPU per process when the node has enough, else the CPU."""
    profile: str | None = None
    """A measured profile (`entrain profile`): the assignment balances measured seconds
    instead of FLOPs."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps, and after the last (0: never)."""
    checkpoint_dir: str | None = None
    """Where checkpoints go (default: the --resume folder, else OUT/checkpoints)."""
    resume: str | None = None
    """Continue from the latest complete checkpoint in this folder (none yet: start fresh,
    so a restarted run can pass the same flags)."""
    keep_checkpoints: int = 2
    max_deferred_tokens: int | None = None
    """Entrain: most embedding tokens an LLM replica may hold for later microbatches."""
    skip_bad: bool = False
    """Leave out samples whose files are missing, corrupt or disagree with the manifest (and
    samples over max_sample_tokens), logging each, instead of stopping."""
    max_sample_tokens: int = 8192
    """Most LLM tokens one sample may have (the runtime LLM's position limit)."""
    validate: str = "full"
    """Check samples against their files before training: "full" decodes every image
    (catches truncated files), "headers" reads only headers (fast on large data; a file
    broken past its header then fails when training reaches it), "off" skips the check."""

    def _check_optim(self) -> None:
        _finite("lr", self.lr)
        _finite("weight_decay", self.weight_decay)
        if self.clip_grad is not None and not (
            math.isfinite(self.clip_grad) and self.clip_grad > 0
        ):
            raise ValueError(f"--clip-grad must be > 0 (or none), got {self.clip_grad!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(
                f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"--min-lr-ratio must be within [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise ValueError(
                f"--warmup-steps {self.warmup_steps}: the warm-up must fit in the run's "
                f"{self.steps} steps"
            )
        if self.decay_steps is not None and not self.warmup_steps <= self.decay_steps <= self.steps:
            raise ValueError(
                f"--decay-steps {self.decay_steps}: the schedule must end within the run's "
                f"{self.steps} steps, after the {self.warmup_steps} warm-up steps"
            )

    def lr_at(self, step: int) -> float:
        """The learning rate of 0-based `step` (runtime/optim.py's schedule)."""
        end = self.decay_steps if self.decay_steps is not None else self.steps
        return lr_at(step, self.lr, self.lr_schedule, self.warmup_steps, end, self.min_lr_ratio)

    def __post_init__(self) -> None:
        check_device(self.device)
        if isinstance(self.freeze, str):
            self.freeze = tuple(x for x in self.freeze.split(",") if x)
        self.freeze = tuple(self.freeze)
        if self.init_from in ("none", ""):
            self.init_from = None
        self._check_optim()
        recompute_of(self.recompute)  # refuses a bad value now, not on the ranks
        copies_of(self.encoder_copies)
        if self.data_workers < 0:
            raise ValueError(f"--data-workers must be >= 0, got {self.data_workers}")
        if self.cache_mb is not None and not self.cache_mb >= 0:
            raise ValueError(f"--cache-mb must be >= 0, got {self.cache_mb}")
        if self.validate not in ("full", "headers", "off"):
            raise ValueError(f"--validate must be full, headers or off, got {self.validate!r}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("--checkpoint-every must be >= 0 and --keep-checkpoints >= 1")
        if self.max_deferred_tokens is not None and self.max_deferred_tokens < 0:
            raise ValueError(f"--max-deferred-tokens must be >= 0, got {self.max_deferred_tokens}")
        for name in ("steps", "global_batch", "microbatches", "dp"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        ok = self.lookahead is None or self.lookahead == "auto"
        ok = ok or (isinstance(self.lookahead, int) and self.lookahead >= 0)
        if not ok:
            raise ValueError(f"--lookahead must be auto, unlimited or >= 0, got {self.lookahead!r}")
        if self.global_batch % self.dp:
            raise ValueError(
                f"--global-batch {self.global_batch} is not divisible by --dp {self.dp}"
            )


def _finite(name: str, value: float, low: float = 0.0) -> None:
    if not isinstance(value, int | float) or not math.isfinite(value) or value < low:
        raise ValueError(
            f"--{name.replace('_', '-')} must be a finite number >= {low}, got {value!r}"
        )


def copies_of(text: str) -> dict[str, int]:
    """--encoder-copies as {encoder: copies}."""
    out: dict[str, int] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, _, n = part.partition("=")
        if not name or not n.isdigit() or int(n) < 1:
            raise ValueError(f"--encoder-copies must be ENCODER=N,... with N >= 1, got {text!r}")
        out[name] = int(n)
    return out


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


def recompute_of(text: str) -> dict[str, str]:
    """--recompute as {module: none|full}; "*" for the modules it does not name."""
    modes = ("none", "full")
    if text in modes:
        return {"*": text}
    out: dict[str, str] = {"*": "none"}
    for part in text.split(","):
        module, _, mode = part.partition("=")
        if not module or mode not in modes:
            raise ValueError(
                f"--recompute must be none, full, or MODULE=none|full,..., got {text!r}"
            )
        out[module.strip()] = mode
    return out


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


def item_locator(workload: Workload):
    """(encoder, sample, item id as numbered by cost_batch) -> (modality, index in the sample)."""

    def locate(enc, sample: int, item: int) -> tuple[str, int]:
        base = 0
        for m in enc.modalities:
            t = workload.items[m]
            if item < base + len(t):
                p = item - base
                return m, int(p - np.searchsorted(t.sample, t.sample[p]))
            base += len(t)
        raise AssertionError("item outside the encoder's modalities")

    return locate


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
    indices = data.batch_order(step, cfg.global_batch, cfg.seed, cfg.shuffle)
    w = data.workload.take(indices)
    batch = cost_batch(w, data.spec, cost_model)
    asg = assign(
        cfg.policy,
        batch,
        cfg.dp,
        cfg.microbatches,
        cfg.lookahead,
        cfg.pool,
        max_deferred_tokens=cfg.max_deferred_tokens,
    )
    plan = IterationPlan.build(
        batch, asg, data.spec, llm_stages, item_locator(w), value_bytes, copies
    )
    return Step(indices, batch, asg, plan)


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
    from entrain.plan.run import choose_lookahead

    model = profile.cost_model()
    n = min(batches, len(data) // cfg.global_batch)
    costed = [
        cost_batch(data.workload.take(data.batch_order(i, cfg.global_batch, cfg.seed, cfg.shuffle)),
                   data.spec, model)
        for i in range(n)
    ]  # fmt: skip
    return choose_lookahead(
        data.spec, costed, plan, profile.hardware(), cfg.pool, cfg.max_deferred_tokens
    )[0]

"""A training run's configuration: one dataclass per component, and the one place its
defaults, validation, command-line flags, help and recipe keys come from. No torch.

`TrainConfig` is the union of the components (dataclass inheritance: every field once,
flat to read, `dataclasses.replace` to change). Each component validates its own fields;
`TrainConfig` checks what spans components. A field's docstring is its `--help`; its
metadata may name its flag (`--data` for the manifest path) and its recipe key (`path` in
section `data`). From these:

- `add_flags(parser)` makes `entrain train`'s flags (no default of their own: a flag given
  wins over a recipe, a recipe over the defaults);
- a recipe is YAML (or JSON) with one mapping per section, `section.key=value` overrides it
  from the command line, and an unknown section or key is one error naming the file;
- `to_recipe()` / `from_dict()` write and read a run's config.json typed, by section.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from entrain.cost.emulated import absolute, is_emulated
from entrain.cost.flops import CostModel
from entrain.cost.hardware import HARDWARE
from entrain.models.spec import ModelSpec
from entrain.schedule import ORDERS, POLICIES
from entrain.schedule.steps import StepRecipe

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
SCHEDULES = ("constant", "cosine", "linear")
VALIDATE = ("full", "headers", "off")


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the flag, key or file."""


def empty_microbatches(microbatches: int, global_batch: int, dp: int) -> int:
    """Microbatches per replica that a global batch leaves without a sample (training and
    `entrain analyze` refuse the shape unless asked)."""
    return max(0, microbatches - global_batch // dp)


def _finite(name: str, value: float, low: float = 0.0) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < low
    ):
        raise ConfigError(
            f"--{name.replace('_', '-')} must be a finite number >= {low}, got {value!r}"
        )


def _at_least(cfg: object, low: int, *names: str) -> None:
    for name in names:
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < low):
            raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {v!r}")


def opt(flag: str | None = None, key: str | None = None, **more: Any) -> dict:
    """Field metadata: its command-line flag and its recipe key, when not the field's name."""
    return {"flag": flag, "key": key, **more}


# ------------------------------------------------------------------------------ components


@dataclass(kw_only=True)
class DataConfig:
    data: str = field(default="", metadata=opt("--data", "path"))
    """Training manifest: the sizes, text or conversation, and files of every sample."""
    validate: str = "full"
    """Check samples against their files before training: full (decodes every image and
    video), headers (reads headers only; fast on large data), off."""
    skip_bad: bool = False
    """Leave out samples whose files are missing, corrupt or disagree with the manifest
    (listed in OUT/skipped.jsonl) instead of stopping."""
    max_sample_tokens: int = 8192
    """Most LLM tokens one sample may have."""
    shuffle: bool = field(default=True, metadata=opt("--no-shuffle"))
    """Shuffle the samples every epoch (seeded by the seed and the epoch)."""
    data_workers: int = 1
    """Processes per encoder rank that decode the next step's images, videos and audio
    while this step trains (0: decode on the rank when needed)."""
    cache_mb: float | None = 2048
    """Most megabytes of decoded inputs an encoder rank keeps, least recently used out
    (none: no bound)."""

    def check_data(self) -> None:
        if self.validate not in VALIDATE:
            raise ConfigError(
                f"--validate must be one of {', '.join(VALIDATE)}, got {self.validate!r}"
            )
        _at_least(self, 1, "max_sample_tokens")
        _at_least(self, 0, "data_workers")
        if self.cache_mb is not None:
            _finite("cache_mb", self.cache_mb)


@dataclass(kw_only=True)
class ModelConfig:
    model: str = field(default="tiny", metadata=opt("--model", "name"))
    """Model preset, spec file, or a local Hugging Face model folder (config.json and
    safetensors: Qwen2-VL, Qwen2.5-VL)."""
    init_from: str | None = field(default="same", metadata=opt(none="none"))
    """Weights to start from: same (the --model folder), another folder, or none (random,
    seeded)."""
    audio_from: str | None = None
    """A Whisper model folder whose encoder becomes the audio encoder (a new projector)."""
    freeze: tuple[str, ...] = ()
    """Modules that do not train, comma-separated (vision, audio, llm); a frozen encoder's
    projector still trains."""
    tokenizer: str | None = None
    """Tokenizer folder (default: the model folder's own; presets use the byte tokenizer)."""


@dataclass(kw_only=True)
class ParallelConfig:
    dp: int = 1
    """Data-parallel replicas."""
    pp: int | None = None
    """LLM pipeline stages (default: the ranks left per replica after the encoders)."""
    microbatches: int = 4
    """Microbatches per replica per step."""
    allow_empty_microbatches: bool = False
    """Run even when a replica has fewer samples a step than microbatches (the extra
    microbatches are empty: they cost pipeline slots and train nothing)."""
    encoder_copies: str = ""
    """Encoders on several ranks per replica, e.g. vision=2: each copy encodes a share of
    every encoder microbatch, split by cost."""
    device: str = "auto"
    """Where ranks compute: cuda, cpu, or auto (a GPU per process when the node has one for
    every process, else the CPU); or emulate[:h100|a100|h200|PROFILE.json] (default h100):
    no model, each forward and backward sleeps the time the simulator gives it on that
    device, messages keep the protocol with small payloads, and a sizes-only manifest is
    enough."""
    time_scale: float = 4.0
    """With --device emulate: emulated seconds = simulated seconds x this. Above 1 it slows
    the run down so that the runtime's own costs on a small machine (many ranks sharing few
    cores) stay small against the sleeps; 4 makes an omni-7b step on 16 ranks about 3 s."""
    timeout_s: float = field(default=300.0, metadata=opt("--timeout", "timeout"))
    """Seconds a rank waits for a message before it fails naming what it waited for."""
    pin_cores: bool = False
    """Pin each local rank to a CPU core of its own (steadier CPU timings)."""

    def check_parallel(self) -> None:
        _at_least(self, 1, "dp", "pp", "microbatches")
        if self.device not in DEVICES and not is_emulated(self.device):
            raise ConfigError(
                f"--device must be one of {', '.join(DEVICES)} or emulate[:"
                f"{'|'.join(HARDWARE)}|PROFILE.json], got {self.device!r}"
            )
        _finite("time_scale", self.time_scale)
        if self.time_scale <= 0:
            raise ConfigError(f"--time-scale must be > 0, got {self.time_scale}")
        _finite("timeout", self.timeout_s)
        if self.timeout_s <= 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {self.timeout_s}")
        copies_of(self.encoder_copies)


@dataclass(kw_only=True)
class ScheduleConfig:
    policy: str = "entrain"
    """Assignment policy: sequential, llm-balanced, encoder-balanced, joint,
    encoder-rebalance or entrain."""
    lookahead: int | None | str = field(
        default="auto", metadata=opt(none="unlimited", parse="lookahead")
    )
    """Entrain: microbatches an encoder may run ahead of the LLM (unlimited, or auto: with a
    profile, the depth the simulator finds fastest on the first batches; without, 1)."""
    pool: int | None = None
    """Entrain: replicas whose encoders share units (default: all)."""
    microbatch_order: str = "light-first"
    """Entrain: light-first (the LLM bounds the pipeline), heavy-first (a frozen encoder
    does), balanced (LLM packed as data-parallel trainers do, only encoders rebalanced) or
    encoder-first / joint (packed as those baselines pack); `entrain plan` picks one."""
    max_deferred_tokens: int | None = None
    """Entrain: most embedding tokens an LLM replica may hold for later microbatches."""
    profile: str | None = None
    """A measured profile (entrain profile): balance measured seconds instead of FLOPs."""

    def check_schedule(self) -> None:

        if self.policy not in POLICIES:
            raise ConfigError(f"--policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        ok = self.lookahead is None or self.lookahead == "auto"
        ok = ok or (isinstance(self.lookahead, int) and not isinstance(self.lookahead, bool)
                    and self.lookahead >= 0)  # fmt: skip
        if not ok:
            raise ConfigError(
                f"--lookahead must be auto, unlimited or >= 0, got {self.lookahead!r}"
            )
        _at_least(self, 1, "pool")
        _at_least(self, 0, "max_deferred_tokens")
        if self.microbatch_order not in ORDERS:
            raise ConfigError(
                f"--microbatch-order must be one of {', '.join(ORDERS)}, "
                f"got {self.microbatch_order!r}"
            )


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay, on matrices only (not on norm scales and biases)."""
    lr_schedule: str = "constant"
    """After warm-up: constant, cosine or linear decay to min_lr_ratio x lr at decay_steps."""
    warmup_steps: int = 0
    """Steps of linear warm-up from lr / warmup_steps to lr."""
    decay_steps: int | None = None
    """Step where the decay reaches its floor (default: the run's length)."""
    min_lr_ratio: float = 0.0
    """The decay's floor, as a fraction of lr."""
    clip_grad: float | None = field(default=1.0, metadata=opt(none="none"))
    """Clip the gradient's global L2 norm over the whole model to this (none: no clipping)."""
    shard_optimizer: bool = field(default=True, metadata=opt("--no-shard-optimizer"))
    """ZeRO-1: each replica (and copy) of a module keeps 1/n of its AdamW state."""

    def check_optim(self) -> None:
        _finite("lr", self.lr)
        _finite("weight_decay", self.weight_decay)
        if self.clip_grad is not None and not (
            isinstance(self.clip_grad, int | float) and math.isfinite(self.clip_grad)
            and self.clip_grad > 0
        ):  # fmt: skip
            raise ConfigError(f"--clip-grad must be > 0 (or none), got {self.clip_grad!r}")
        if self.lr_schedule not in SCHEDULES:
            raise ConfigError(
                f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}"
            )
        _finite("min_lr_ratio", self.min_lr_ratio)
        if self.min_lr_ratio > 1.0:
            raise ConfigError(f"--min-lr-ratio must be within [0, 1], got {self.min_lr_ratio}")
        _at_least(self, 0, "warmup_steps", "decay_steps")


@dataclass(kw_only=True)
class LoopConfig:
    steps: int = 10
    """Optimizer steps."""
    global_batch: int = 16
    """Samples per step, over all replicas."""
    seed: int = 0
    """Seeds the data order and random weights."""
    precision: str = "auto"
    """fp32, or bf16 compute (autocast) with fp32 weights and optimizer state and bf16
    messages between ranks; auto: bf16 on GPUs, fp32 on the CPU."""
    recompute: str = "none"
    """Activation recompute per transformer block: none, full, or per module, e.g.
    vision=full,llm=none."""

    def check_loop(self) -> None:
        _at_least(self, 1, "steps", "global_batch")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        recompute_of(self.recompute)


@dataclass(kw_only=True)
class CheckpointConfig:
    checkpoint_every: int = field(default=0, metadata=opt(key="every"))
    """Save a checkpoint every this many steps, and after the last (0: never)."""
    checkpoint_dir: str | None = field(default=None, metadata=opt(key="dir"))
    """Where checkpoints go (default: the --resume folder, else OUT/checkpoints)."""
    resume: str | None = None
    """Continue from the latest complete checkpoint in this folder (none yet: start fresh)."""
    keep_checkpoints: int = field(default=2, metadata=opt(key="keep"))
    """Complete checkpoints kept."""
    checkpoint_on_stop: bool = field(default=False, metadata=opt(key="on_stop"))
    """Write a checkpoint when the run is stopped (SIGTERM, SIGINT, SIGHUP, or the launcher
    gone) after the step in progress, even when none is due."""

    def check_checkpoint(self) -> None:
        _at_least(self, 0, "checkpoint_every")
        _at_least(self, 1, "keep_checkpoints")


@dataclass(kw_only=True)
class RunConfig:
    out: str | None = None
    """Run directory: metrics.jsonl, samples.jsonl, config.json, trace.json."""
    overwrite: bool = False
    """Replace the run already in --out (without it, a run there must be continued with
    --resume or left alone)."""
    trace: bool = False
    """Write a Chrome/Perfetto trace of the last step (trace.json) and the messages it sent
    (messages.json: sender, receiver, key and bytes, each sender's in its order)."""
    tensorboard: bool = False
    """Also write TensorBoard event files next to metrics.jsonl (needs tensorboard)."""
    save_params: bool = False
    """Write every rank's parameters and gradients after the last step (the equivalence
    tests read them)."""
    profile_memory: bool = False
    """Measure the last step's peak live tensor bytes on every rank (OUT/memory-RANK.json),
    to compare with entrain plan's memory model."""


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "schedule": ScheduleConfig,
    "optim": OptimConfig,
    "train": LoopConfig,
    "checkpoint": CheckpointConfig,
    "run": RunConfig,
}


@dataclass(kw_only=True)
class TrainConfig(
    RunConfig,
    CheckpointConfig,
    LoopConfig,
    OptimConfig,
    ScheduleConfig,
    ParallelConfig,
    ModelConfig,
    DataConfig,
):
    """A training run: every component's settings, each field once."""

    def __post_init__(self) -> None:
        if isinstance(self.freeze, str):
            self.freeze = tuple(x for x in self.freeze.split(",") if x)
        self.freeze = tuple(self.freeze)
        if self.init_from in ("none", ""):
            self.init_from = None
        self.check_data()
        self.check_parallel()
        self.check_schedule()
        self.check_optim()
        self.check_loop()
        self.check_checkpoint()
        self.check_across()

    def check_across(self) -> None:
        """What spans components."""
        if self.global_batch % self.dp:
            raise ConfigError(
                f"--global-batch {self.global_batch} is not divisible by --dp {self.dp}"
            )
        if self.empty_microbatches and not self.allow_empty_microbatches:
            per_replica = self.global_batch // self.dp
            raise ConfigError(
                f"--microbatches {self.microbatches}: a replica has only {per_replica} "
                f"sample(s) a step (--global-batch {self.global_batch} over --dp {self.dp}), "
                f"so {self.empty_microbatches} microbatch(es) would be empty; use fewer "
                "microbatches, a larger global batch, or --allow-empty-microbatches"
            )
        if self.overwrite and self.resume:
            raise ConfigError(
                "--overwrite replaces the run in --out and --resume continues it: give one"
            )
        if self.warmup_steps > self.steps:
            raise ConfigError(
                f"--warmup-steps {self.warmup_steps}: the warm-up must fit in the run's "
                f"{self.steps} steps"
            )
        if self.decay_steps is not None and not self.warmup_steps <= self.decay_steps <= self.steps:
            raise ConfigError(
                f"--decay-steps {self.decay_steps}: the schedule must end within the run's "
                f"{self.steps} steps, after the {self.warmup_steps} warm-up steps"
            )

    @property
    def empty_microbatches(self) -> int:
        """Microbatches per replica that get no sample in any step."""
        return empty_microbatches(self.microbatches, self.global_batch, self.dp)

    def lr_at(self, step: int) -> float:
        """The learning rate of 0-based `step`."""
        end = self.decay_steps if self.decay_steps is not None else self.steps
        return lr_at(step, self.lr, self.lr_schedule, self.warmup_steps, end, self.min_lr_ratio)

    def step_recipe(self, spec: ModelSpec, cost_model: CostModel | None = None) -> StepRecipe:
        """What each step of this run trains on. A lookahead of "auto" must be settled first
        (the runtime asks the simulator and records the depth it chose in config.json)."""
        if self.lookahead == "auto":
            raise ConfigError("lookahead 'auto' must be resolved before the run's steps are built")
        return StepRecipe(
            spec=spec,
            global_batch=self.global_batch,
            dp=self.dp,
            microbatches=self.microbatches,
            policy=self.policy,
            seed=self.seed,
            shuffle=self.shuffle,
            lookahead=self.lookahead,
            pool=self.pool,
            order=self.microbatch_order,
            max_deferred_tokens=self.max_deferred_tokens,
            cost_model=cost_model,
        )

    def to_recipe(self) -> dict[str, dict[str, Any]]:
        """The config by section and key, as a recipe writes it (JSON/YAML-ready)."""
        out: dict[str, dict[str, Any]] = {}
        for name, section in SECTIONS.items():
            out[name] = {}
            for f in dataclasses.fields(section):
                v = getattr(self, f.name)
                out[name][_key(f)] = list(v) if isinstance(v, tuple) else v
        return out

    @staticmethod
    def from_dict(data: dict, where: str = "config") -> TrainConfig:
        """A config from its recipe form ({section: {key: value}}), or from the flat form of
        field names (runs written before sections), with every key checked."""
        if all(isinstance(v, dict) for v in data.values()) and set(data) <= set(SECTIONS):
            return TrainConfig(**recipe_to_fields(data, where))
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: _tuple(v) for k, v in data.items() if k in known})


def lr_at(
    step: int, lr: float, schedule: str, warmup: int, decay_steps: int, min_ratio: float
) -> float:
    """The learning rate of 0-based `step`: warm-up over `warmup` steps from lr/warmup, then
    `schedule` from lr at the end of warm-up to lr * min_ratio at `decay_steps`."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    span = max(1, decay_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        shape = 1.0 - progress
    return lr * (min_ratio + (1.0 - min_ratio) * shape)


def _tuple(v):
    return tuple(v) if isinstance(v, list) else v


# ---------------------------------------------------------------------- shared parsers


def lookahead_value(text: str) -> int | None | str:
    """auto, unlimited (or -1, as older runs wrote it), or N >= 0."""
    if text in ("auto", "unlimited", "none"):
        return None if text != "auto" else text
    try:
        n = int(text)
    except ValueError:
        raise ConfigError(
            f"--lookahead: expected auto, unlimited or N >= 0, got {text!r}"
        ) from None
    if n < -1:
        raise ConfigError(f"--lookahead: expected auto, unlimited or N >= 0, got {n}")
    return None if n == -1 else n


def copies_of(text: str) -> dict[str, int]:
    """--encoder-copies as {encoder: copies}."""
    out: dict[str, int] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        name, _, n = part.partition("=")
        if not name or not n.isdigit() or int(n) < 1:
            raise ConfigError(f"--encoder-copies must be ENCODER=N,... with N >= 1, got {text!r}")
        out[name] = int(n)
    return out


def recompute_of(text: str) -> dict[str, str]:
    """--recompute as {module: none|full}; "*" for the modules it does not name."""
    modes = ("none", "full")
    if text in modes:
        return {"*": text}
    out: dict[str, str] = {"*": "none"}
    for part in text.split(","):
        module, _, mode = part.partition("=")
        if not module or mode not in modes:
            raise ConfigError(
                f"--recompute must be none, full, or MODULE=none|full,..., got {text!r}"
            )
        out[module.strip()] = mode
    return out


# ----------------------------------------------------------------- fields: flags and keys


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


@cache
def field_help(cls: type) -> dict[str, str]:
    """Each field's docstring (the string right after its annotation), joined to one line."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    out = {}
    for a, b in zip(body, body[1:]):
        if (
            isinstance(a, ast.AnnAssign)
            and isinstance(a.target, ast.Name)
            and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant)
            and isinstance(b.value.value, str)
        ):
            out[a.target.id] = " ".join(b.value.value.split())
    return out


def _number(text: Any, kind: type) -> int | float | None:
    if isinstance(text, bool):
        return None
    if kind is int:
        if isinstance(text, int):
            return text
        if isinstance(text, str) and re.fullmatch(r"-?\d+", text.strip()):
            return int(text)
        return None
    if isinstance(text, int | float):
        return float(text)
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def parse_value(f: dataclasses.Field, hint: Any, text: Any, where: str) -> Any:
    """A value for field `f` from a command-line string or a recipe's YAML value."""
    if isinstance(text, str) and f.metadata.get("parse") == "lookahead":
        return lookahead_value(text)
    args = typing.get_args(hint)
    optional = type(None) in args
    none_word = f.metadata.get("none", "none")
    if isinstance(text, str) and optional and text.lower() in (none_word, "none", "null"):
        return None
    if text is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {_key(f)} cannot be empty")
    base = [a for a in args if a is not type(None)] or [hint]
    if hint is bool or bool in base and len(base) == 1:
        if isinstance(text, bool):
            return text
        if isinstance(text, str) and text.lower() in ("true", "yes", "1", "false", "no", "0"):
            return text.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: {_key(f)} must be true or false, got {text!r}")
    if typing.get_origin(hint) is tuple or tuple in (typing.get_origin(b) for b in base):
        if isinstance(text, list | tuple):
            return tuple(str(x) for x in text)
        return tuple(x for x in str(text).split(",") if x)
    for kind in (int, float):
        if kind in base:
            value = _number(text, kind)
            if value is not None:
                return value
            if str not in base:
                what = "an integer" if kind is int else "a number"
                raise ConfigError(f"{where}: {_key(f)} must be {what}, got {text!r}")
    return str(text)


# -------------------------------------------------------------------------------- recipes


def recipe_to_fields(recipe: dict, where: str) -> dict[str, Any]:
    """Field values from {section: {key: value}}, each section and key checked."""
    out: dict[str, Any] = {}
    for section, values in recipe.items():
        cls = SECTIONS.get(section)
        if cls is None:
            raise ConfigError(
                f"{where}: unknown section {section!r}; sections: {', '.join(SECTIONS)}"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section {section!r} must be a mapping of keys to values")
        fields = {_key(f): f for f in dataclasses.fields(cls)}
        hints = _hints(cls)
        for key, value in values.items():
            f = fields.get(key)
            if f is None:
                raise ConfigError(
                    f"{where}: unknown key {section}.{key}; {section} has {', '.join(fields)}"
                )
            out[f.name] = parse_value(f, hints[f.name], value, f"{where}: {section}")
    return out


def load_recipe(path: str | os.PathLike) -> dict:
    """A recipe file's sections (YAML or JSON), with one error naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"recipe {path}: cannot read it ({e.strerror or e})") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"recipe {path}: cannot parse it ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of sections at the top level")
    return data


def apply_overrides(recipe: dict, overrides: list[str]) -> dict:
    """`section.key=value` pairs on top of a recipe (values read as YAML scalars)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in recipe.items()}
    for item in overrides:
        name, sep, value = item.partition("=")
        section, dot, key = name.partition(".")
        if not sep or not dot or not section or not key:
            raise ConfigError(f"override {item!r}: expected section.key=value, e.g. train.steps=2")
        try:
            parsed = yaml.safe_load(value) if value else None
        except yaml.YAMLError:
            parsed = value
        out.setdefault(section, {})[key] = parsed
    return out


def add_flags(parser) -> None:
    """Every field's flag on an argparse parser, grouped by component, with its docstring as
    help; no defaults of their own (given flags override a recipe)."""
    import argparse

    for name, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{name} (recipe section {name!r})")
        docs, hints = field_help(cls), _hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = "none" if default is None else default
            text = docs.get(f.name, "") + f" [{name}.{_key(f)}; default {shown}]"
            flag = _flag(f)
            if hints[f.name] is bool:
                action = "store_false" if default else "store_true"
                group.add_argument(flag, dest=f.name, action=action, default=argparse.SUPPRESS,
                                   help=text)  # fmt: skip
                continue
            group.add_argument(
                flag,
                dest=f.name,
                default=argparse.SUPPRESS,
                metavar=f.name.upper() if flag[2:] == f.name.replace("_", "-") else None,
                type=_converter(f, hints[f.name]),
                help=text.replace("%", "%%"),
            )


def _converter(f: dataclasses.Field, hint: Any):
    import argparse

    def convert(text: str):
        try:
            return parse_value(f, hint, text, _flag(f))
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).split(": ", 1)[-1]) from None

    return convert


def config_from(
    flags: dict[str, Any], recipe: str | os.PathLike | None = None, overrides: list[str] = ()
) -> TrainConfig:
    """The run's config: defaults, then the recipe, then `section.key=value` overrides, then
    the flags given on the command line."""
    sections = load_recipe(recipe) if recipe else {}
    sections = apply_overrides(sections, list(overrides))
    where = f"recipe {recipe}" if recipe else "override"
    values = recipe_to_fields(sections, where)
    values.update(flags)
    if not values.get("data"):
        raise ConfigError("no training manifest: give --data FILE or data.path in a recipe")
    return TrainConfig(**values)


# ----------------------------------------------------------------------- a run's record


@dataclass
class RunRecord:
    """What a run directory's config.json says: the config it trained with (by section), its
    parallel plan and its world size, and each launch of the run (runtime/rundir.py)."""

    config: TrainConfig
    plan: dict
    world: int
    segments: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        body = {"config": self.config.to_recipe(), "plan": self.plan, "world": self.world}
        if self.segments:
            body["segments"] = self.segments
        return json.dumps(body, indent=2) + "\n"


PATH_FIELDS = ("data", "profile", "model", "init_from", "audio_from", "tokenizer")
"""Fields holding paths: a run records them absolute, so replay and export work from any
directory."""


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    changes = {}
    for name in PATH_FIELDS:
        value = getattr(cfg, name)
        if value and os.path.exists(value):
            changes[name] = os.path.abspath(value)
    if absolute(cfg.device) != cfg.device:  # --device emulate:PROFILE.json
        changes["device"] = absolute(cfg.device)
    return dataclasses.replace(cfg, **changes)


def read_run_config(run_dir: str | os.PathLike) -> RunRecord:
    """A run directory's config.json, typed (runs written before sections, with flat keys,
    read too); one error naming the file when it cannot be."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no config.json (was it trained with --out {run_dir}?)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "plan" not in data:
        raise ConfigError(f"{path}: not the config.json of an `entrain train` run")
    body = data["config"] if isinstance(data.get("config"), dict) else data
    segments = data.get("segments")
    return RunRecord(
        TrainConfig.from_dict(body, str(path)),
        data["plan"],
        int(data.get("world", 0)),
        segments if isinstance(segments, list) else [],
    )


__all__ = [
    "RunRecord",
    "read_run_config",
    "with_absolute_paths",
    "SECTIONS",
    "ConfigError",
    "TrainConfig",
    "add_flags",
    "apply_overrides",
    "config_from",
    "copies_of",
    "field_help",
    "load_recipe",
    "recipe_to_fields",
    "recompute_of",
]

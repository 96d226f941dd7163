"""`--device emulate[:h100|a100|h200|PROFILE.json]`: the real runtime with no model, to
measure what the runtime itself costs at layouts this machine cannot hold.

Real: the launcher, torchrun, every rank and its role, the plan-ahead thread, the step
program, the Mailbox protocol over gloo (headers, ids, order, every check), the workers'
own loops and autograd calls, the gradient all-reduce, clipping, AdamW, checkpoints,
`--resume` and metrics.jsonl.

Emulated:
- The model. Each rank holds one scalar weight. A forward or backward of a microbatch
  sleeps for the seconds the simulator gives that operation on the emulated device
  (sim/durations.py, the function the simulator builds its nodes from) times
  --time-scale, inside a torch.autograd.Function, so the engine's workers run unchanged:
  the backward sleeps when their `backward` call reaches it. A sleep never ends early and
  ends late by little: the host's wake-up latency (about a millisecond a sleep with 32
  ranks on 2 cores) is learnt and asked for less (`_Waker`). An LLM microbatch's forward
  ends its time after its first sample started, however much host work the worker's
  per-sample loop did meanwhile (as a GPU computes while the host issues the next
  kernels): its last sample's call sleeps what is left. Its backward sleeps once.
- After its last backward a rank also sleeps its module's gradient all-reduce and
  optimizer step (the real collectives that follow carry one scalar and cost next to
  nothing): each replica sleeps after its own last backward and the real all-reduce then
  waits for the slowest, which is when the simulator starts the ring.
- The payloads. A message carries one value per row instead of the model's width, with
  the real headers, ids and row counts, and is padded to a capacity worked out the same
  way, so 32 ranks on 2 cores are not spent copying megabytes. What a transfer would take
  on the emulated link (microseconds against tens of milliseconds of compute on an H100
  layout) is not slept.
- The data: a manifest's sizes (what `entrain trace generate` writes) are enough; nothing
  is read, decoded, tokenized or validated. The loss normalizer counts text tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from entrain.cost.batch import cost_batch
from entrain.cost.emulated import emulated_device, is_emulated
from entrain.data.sequence import Span
from entrain.models.spec import ModelSpec
from entrain.program.iteration import IterationPlan
from entrain.program.transfers import Role
from entrain.runtime.engine import EncoderWorker, LLMWorker
from entrain.runtime.setup import SampleInputs, Step, TrainConfig
from entrain.schedule.parallel import ParallelPlan
from entrain.sim.durations import OpSeconds, op_seconds
from entrain.workload.manifest import read_manifest

WIDTH = 1
"""Values per row on the wire."""


class _Waker:
    """Sleeps that end when they should. `time.sleep` returns late by the host's wake-up
    latency: microseconds on an idle machine, about a millisecond per call with 16-32 ranks
    on two cores, which over the tens of computes on a step's critical path would be
    counted as the runtime's own cost. The emulated device takes exactly its time, so each
    sleep asks for less by the least latency among this process's recent wake-ups, and a
    wake-up that still comes early waits out the rest without sleeping: a compute never
    ends early, and ends late by only what the latency varies."""

    def __init__(self, keep: int = 16):
        self.recent: deque[float] = deque(maxlen=keep)

    def until(self, deadline: float) -> None:
        ask = deadline - time.perf_counter() - min(self.recent, default=0.0)
        if ask > 0:
            t0 = time.perf_counter()
            time.sleep(ask)
            self.recent.append(max(time.perf_counter() - t0 - ask, 0.0))
        while time.perf_counter() < deadline:  # early by at most the least latency
            pass


_WAKER = _Waker()


def _sleep(seconds: float) -> None:
    if seconds > 0:
        _WAKER.until(time.perf_counter() + seconds)


def plan_sample_inputs(it: IterationPlan, smp: int) -> SampleInputs:
    """A sample's inputs as the plan counts them, with no data: one span per item of its
    units (the rows its encoders send), token ids all zero, the plan's sequence length.
    What an emulated LLM stage (and the p2p tests' stand-in stage) runs on."""
    rows: dict[tuple[str, int], int] = {}
    for e, u in it.prefix[smp]:
        key = (it.units[e][u].modality, it.units[e][u].item)
        rows[key] = rows.get(key, 0) + it.unit_rows[e][u]
    spans, start = [], 0
    for (m, item), n in rows.items():
        spans.append(Span(m, item, start, n))
        start += n
    z = torch.zeros(it.seq_rows[smp], dtype=torch.long)
    return SampleInputs(z, z, torch.arange(len(z))[None], tuple(spans))


class _Busy(torch.autograd.Function):
    """x + w, with the forward taking `fwd_s` seconds and the backward `bwd_s`: a module's
    time without its arithmetic, in autograd's graph like a module."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, fwd_s: float, bwd_s: float):
        _sleep(fwd_s)
        ctx.bwd_s = bwd_s
        return x + w

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        _sleep(ctx.bwd_s)
        return g, g.sum(), None, None


def busy(x: torch.Tensor, w: torch.Tensor, fwd_s: float, bwd_s: float) -> torch.Tensor:
    return _Busy.apply(x, w, fwd_s, bwd_s)


@dataclass
class EmulatedPlan(IterationPlan):
    """A step's plan on the emulated device: messages of `width` values a row (sized as the
    real ones are, row for row), and the seconds every compute of the step sleeps."""

    width: int = WIDTH
    seconds: OpSeconds | None = None

    @staticmethod
    def of(plan: IterationPlan, seconds: OpSeconds, width: int = WIDTH) -> EmulatedPlan:
        fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(IterationPlan)}
        fields["messages"] = plan.message_table(width)
        return EmulatedPlan(**fields, width=width, seconds=seconds)


# ------------------------------------------------------------------------------ the data


@dataclass(frozen=True)
class _Sample:
    id: str


@dataclass(frozen=True)
class _Targets:
    targets: int


class _NoLoader:
    """The decoding loader's interface, with nothing to decode."""

    def want(self, keys: Iterable) -> None:
        pass

    def take_wait(self) -> float:
        return 0.0

    def close(self) -> None:
        pass


class SizesOnly:
    """What the trainer asks of its Dataset, answered from a manifest's sizes: no text,
    files or tokenizer. The loss normalizer counts each sample's text tokens as targets."""

    def __init__(self, path: str, spec: ModelSpec):
        self.spec = spec
        self.workload = read_manifest(path)
        self.records = [_Sample(i) for i in self.workload.ids]
        self.loader = _NoLoader()

    def __len__(self) -> int:
        return len(self.workload)

    def tokens(self, index: int) -> _Targets:
        return _Targets(int(self.workload.text_tokens[index]))

    def key(self, index: int, ref) -> tuple:
        return (ref.modality, index, ref.item)


# --------------------------------------------------------------------------- the workers


class EmulatedEncoderWorker(EncoderWorker):
    """An encoder rank that sleeps its module's all-reduce and optimizer step after its
    step's last backward."""

    def step(self, it: EmulatedPlan, program, mail, stats, before_last_backward=None) -> None:
        super().step(it, program, mail, stats, before_last_backward)
        _sleep(it.seconds.after_backward(self.role.module))


class EmulatedLLMWorker(LLMWorker):
    """An LLM stage rank that sleeps the LLM's all-reduce and optimizer step after its
    step's last backward."""

    def step(self, it: EmulatedPlan, program, mail, stats, loss_tokens, before_last_backward=None):
        total = super().step(it, program, mail, stats, loss_tokens, before_last_backward)
        _sleep(it.seconds.after_backward("llm"))
        return total


class _Encoder:
    """`encode(units)` of an encoder copy: one tensor of the units' rows per unit, made in one
    call that takes the microbatch's forward time (its backward, the microbatch's)."""

    def __init__(self, role: Role, weight: nn.Parameter, current: Callable[[], Step]):
        self.role, self.weight, self.current = role, weight, current

    def __call__(self, units: list[int]) -> list[torch.Tensor]:
        it: EmulatedPlan = self.current().plan
        e, r, c = self.role.module, self.role.replica, self.role.copy
        k = int(it.asg.unit_mb[e][units[0]])  # a call holds one encoder microbatch's units
        rows = [it.unit_rows[e][u] for u in units]
        x = torch.zeros(sum(rows), it.width)  # (rows, width)
        f, b = it.seconds.compute(e, r, "F", k, c), it.seconds.compute(e, r, "B", k, c)
        return list(torch.split(busy(x, self.weight, f, b), rows))


class _Stage:
    """An LLM pipeline stage as LLMWorker uses it, without layers. The worker asks for a
    sample's inputs and then runs the stage on that sample, so the stage knows which
    sample it runs from the last `sample` call. A microbatch's forward starts with its
    first sample's inputs and ends, its time later, in its last sample's call; that call's
    backward takes the microbatch's backward time, the others' none."""

    def __init__(self, role: Role, last: bool, weight: nn.Parameter, current: Callable[[], Step]):
        self.role, self.last, self.weight, self.current = role, last, weight, current
        self.running = -1
        self.started = 0.0

    def _microbatch(self, it: EmulatedPlan, smp: int) -> tuple[int, int, list[int]]:
        r, j = int(it.asg.sample_replica[smp]), int(it.asg.sample_mb[smp])
        return r, j, it.llm_mb[(r, j)]

    def sample(self, smp: int) -> SampleInputs:
        """Inputs with one span per item, rows as the plan counts them (ids are zeros)."""
        it: EmulatedPlan = self.current().plan
        self.running = smp
        if self._microbatch(it, smp)[2][0] == smp:  # the microbatch's forward starts
            self.started = time.perf_counter()
        return plan_sample_inputs(it, smp)

    def embed_sample(self, ids: torch.Tensor, spans, items) -> torch.Tensor:
        """(1, L, width): the items' received rows, then zeros for the text."""
        width = self.current().plan.width
        parts = [u for units in items for u in units]
        used = sum(int(p.shape[0]) for p in parts)
        pad = torch.zeros(max(int(ids.shape[0]) - used, 0), width)
        return torch.cat([*parts, pad])[: ids.shape[0]].unsqueeze(0)

    def __call__(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        it: EmulatedPlan = self.current().plan
        r, j, samples = self._microbatch(it, self.running)
        f = b = 0.0
        if samples[-1] == self.running:  # what is left of the microbatch's forward
            f = self.started + it.seconds.compute("llm", r, "F", j) - time.perf_counter()
            b = it.seconds.compute("llm", r, "B", j)
        return busy(h, self.weight, f, b)

    def loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return h.sum() * 1e-3


# -------------------------------------------------------------------------- the emulator


class Emulator:
    """A run's emulated device: its data (sizes only), each step's durations and small
    messages, and each rank's worker."""

    def __init__(self, cfg: TrainConfig, spec: ModelSpec, plan: ParallelPlan):
        self.device = emulated_device(cfg.device, spec)
        self.scale = cfg.time_scale
        self.spec, self.plan = spec, plan
        self.data = SizesOnly(cfg.data, spec)

    def step(self, st: Step) -> Step:
        """The step with its plan narrowed to `WIDTH` values a row and the seconds of each
        of its computes: the simulator's for the batch costed as the device costs it (its
        profile, or FLOPs), times the time scale."""
        timed, model = st.batch, self.device.cost_model
        if model is not None or timed.unit != "flop":  # balanced with another cost model
            timed = cost_batch(self.data.workload.take(st.indices), self.spec, model)
        ops = op_seconds(timed, st.asg, self.spec, self.plan, self.device.hardware)
        return dataclasses.replace(st, plan=EmulatedPlan.of(st.plan, ops.scaled(self.scale)))

    def worker(
        self,
        role: Role,
        trains: dict[str, bool],
        current: Callable[[], Step],
        tied_key: str | None = None,
    ) -> tuple[EncoderWorker | LLMWorker, dict[str, nn.Parameter]]:
        """This rank's worker and its one weight, named by its module group (so replicas
        and copies sum it), or by the tied embedding's key on the LLM's first and last
        stages when the model ties them (so the tie's group has it to sum)."""
        w = nn.Parameter(torch.tensor(1.0))
        P = self.plan.llm_pp
        if role.module != "llm":
            w.requires_grad_(trains[role.module])
            worker = EmulatedEncoderWorker(role, trains[role.module], _Encoder(role, w, current))
            return worker, {f"emulated.{role.name}": w}
        w.requires_grad_(not self.spec.llm_frozen)
        stage = _Stage(role, role.stage == P - 1, w, current)
        name = f"emulated.{role.name}"
        if tied_key is not None and P > 1 and role.stage in (0, P - 1):
            name = tied_key
        return EmulatedLLMWorker(role, stage, stage.sample, {}, trains), {name: w}


def emulator_of(cfg: TrainConfig, spec: ModelSpec, plan: ParallelPlan) -> Emulator | None:
    """The run's emulated device, or None when it runs real modules."""
    return Emulator(cfg, spec, plan) if is_emulated(cfg.device) else None

"""A discrete-event simulator of one training iteration under modality + pipeline + data
parallelism.

Devices are tensor-parallel groups: one per encoder and one per LLM pipeline stage, in every
replica. Each device replays its action list (schedule/pipeline.py); an action starts when
the device is free and every input has arrived:
- LLM stage 0 forward of microbatch (r, k) needs the embeddings of all its samples, from
  whichever encoder microbatch (on whichever replica) produced them, plus their transfer;
- LLM stage s > 0 forward needs stage s-1's forward and the activation transfer;
- a backward needs the next stage's backward and the gradient transfer; an encoder's
  backward needs the gradients of every LLM microbatch that used its units.
Deferral is therefore waiting, not magic. Every copy of an encoder is a device of its own.
The transfers are the runtime's, read from the same table (program/messages.py): one message
of embeddings per (encoder microbatch, copy, LLM replica), taken by the first LLM microbatch
that needs it; gradients per (encoder microbatch, copy, LLM microbatch); activations per
microbatch and stage; each of its exact bytes on the wire (headers and slack rows included).
A transfer delays its receiver, or, where receives are blocking (gloo on CPU), it is part
of the receiver's busy time. After the last backward of a module, its gradients
are all-reduced across replicas (ring). The whole iteration is a longest path in a DAG,
computed in one topological pass.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from entrain.cost.batch import CostedBatch
from entrain.cost.hardware import Hardware
from entrain.models.spec import ModelSpec
from entrain.program.messages import ACT, MessageTable, message_table
from entrain.program.transfers import Role
from entrain.schedule.assignment import Assignment
from entrain.schedule.metrics import deferred_tokens
from entrain.schedule.parallel import ParallelPlan
from entrain.schedule.pipeline import encoder_actions, one_f_one_b
from entrain.sim.durations import op_seconds


@dataclass
class SimResult:
    """One simulated iteration."""

    iter_time: float
    """Seconds from the first action to the end of the last gradient all-reduce."""
    busy: dict[str, float]
    """Busy seconds of each device ("vision/r0", "llm.s1/r3", ...)."""
    bubble_fraction: float
    """Share of GPU-seconds of the iteration spent idle."""
    peak_deferred_tokens: float
    """Most embedding tokens waiting for a later LLM microbatch at once, on one replica."""
    samples: int
    tokens: int
    events: list[tuple[str, str, float, float]] = field(default_factory=list)
    """(device, action, start, end) of every action, when recorded."""
    messages: MessageTable | None = None
    """The messages it timed (the runtime's, program/messages.py)."""

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.iter_time if self.iter_time > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.iter_time if self.iter_time > 0 else 0.0

    def scaled(self, factor: float) -> SimResult:
        """The same iteration with every time multiplied by `factor`: what an emulated run
        (--device emulate, --time-scale) is held to."""
        return dataclasses.replace(
            self,
            iter_time=self.iter_time * factor,
            busy={d: b * factor for d, b in self.busy.items()},
            events=[(d, a, s * factor, f * factor) for d, a, s, f in self.events],
        )


class _Graph:
    """Actions as nodes of a DAG: duration, device, and weighted edges (transfer latency)."""

    def __init__(self) -> None:
        self.dur: list[float] = []
        self.device: list[int] = []
        self.label: list[str] = []
        self.succ: list[list[tuple[int, float]]] = []
        self.indeg: list[int] = []

    def chain(self, device: int, durs: list[float], labels: list[str]) -> range:
        """A device's actions as nodes, each after the one before, in one go (the
        simulator's largest cost at scale is building nodes one by one)."""
        first, n = len(self.dur), len(durs)
        self.dur += durs
        self.device += [device] * n
        self.label += labels
        self.succ += [[(i + 1, 0.0)] for i in range(first, first + n - 1)] + [[]] * (n > 0)
        self.indeg += [0] * (n > 0) + [1] * (n - 1)
        return range(first, first + n)

    def edge(self, a: int, b: int, lat: float = 0.0) -> None:
        self.succ[a].append((b, lat))
        self.indeg[b] += 1

    def transfer(self, a: int, b: int, lat: float, hw: Hardware) -> None:
        """`b` needs data `a` produced, `lat` seconds in transit: a wait, or with blocking
        p2p, busy time of `b`'s device (and the send, of `a`'s)."""
        if hw.blocking_p2p:
            self.dur[a] += hw.send_cost
            self.dur[b] += lat
            self.edge(a, b)
        else:
            self.edge(a, b, lat)

    def longest_path(self) -> tuple[np.ndarray, np.ndarray]:
        """Start and finish time of every node (Kahn's algorithm)."""
        n = len(self.dur)
        ready = [0.0] * n
        start = [0.0] * n
        finish = [0.0] * n
        indeg = list(self.indeg)
        queue = deque(i for i in range(n) if indeg[i] == 0)
        done = 0
        while queue:
            i = queue.popleft()
            start[i] = ready[i]
            finish[i] = ready[i] + self.dur[i]
            done += 1
            for j, lat in self.succ[i]:
                t = finish[i] + lat
                if t > ready[j]:
                    ready[j] = t
                indeg[j] -= 1
                if indeg[j] == 0:
                    queue.append(j)
        if done != n:
            stuck = sorted({self.device[i] for i in range(n) if indeg[i] > 0})
            raise RuntimeError(f"schedule deadlock: devices {stuck[:8]} wait on each other")
        return np.asarray(start), np.asarray(finish)


def simulate(
    batch: CostedBatch,
    asg: Assignment,
    spec: ModelSpec,
    plan: ParallelPlan,
    hw: Hardware,
    record_events: bool = False,
    value_bytes: int | None = None,
) -> SimResult:
    """Simulate one iteration of `asg` under `plan` on `hw`, in the batch's own cost unit.
    `value_bytes`: of a value on the wire (default the hardware's; a replayed run's own wire
    dtype, so the messages timed are the ones it sent)."""
    D, M, P = asg.dp, asg.microbatches, plan.llm_pp
    if (plan.dp, plan.microbatches) != (D, M):
        raise ValueError(
            f"assignment is D={D}, M={M} but the plan is D={plan.dp}, M={plan.microbatches}"
        )
    plan.check_modules(tuple(batch.units))
    ops = op_seconds(batch, asg, spec, plan, hw)  # every compute's duration (sim/durations.py)
    table = message_table(
        batch, asg, spec, P, plan.encoder_dp, value_bytes or hw.bytes_per_value
    )  # every message, as the runtime derives them (program/messages.py)
    ranks = table.ranks
    g = _Graph()
    names = [""] * ranks.world
    gpus = [0] * ranks.world
    node = np.full((ranks.world, 2, M), -1, dtype=np.int64)  # (device, pass, microbatch)

    def chain(dev: int, actions, seconds: tuple[np.ndarray, np.ndarray]) -> None:
        """The device's action list as nodes, each after the one before."""
        passes = np.fromiter(
            (kind == "B" for kind, _ in actions), dtype=np.int64, count=len(actions)
        )
        mbs = np.fromiter((k for _, k in actions), dtype=np.int64, count=len(actions))
        durs = np.where(passes == 1, seconds[1][mbs], seconds[0][mbs]).tolist()
        labels = [f"{kind}{k}" for kind, k in actions] if record_events else [""] * len(actions)
        node[dev, passes, mbs] = np.asarray(g.chain(dev, durs, labels))

    # ---- LLM stages: 1F1B per replica
    for r in range(D):
        rows = slice(r * M, (r + 1) * M)
        for s in range(P):
            dev = ranks.llm(r, s)
            names[dev], gpus[dev] = Role("llm", r, s).device(), plan.llm_tp
            chain(dev, one_f_one_b(P, s, M), (ops.llm_fwd[rows], ops.llm_bwd[rows]))
    finish_groups = {"llm": node[[ranks.llm(r) for r in range(D)], 1].ravel()}

    # ---- encoders: every copy its own device, its microbatches feeding LLM stage 0
    for ei, enc in enumerate(spec.encoders):
        u = batch.units[enc.name]
        tp, copies = plan.encoder_tp[enc.name], ranks.copies[ei]
        trains = not enc.frozen
        # the last LLM microbatch each encoder microbatch feeds (when its backward can run)
        need = np.full(D * M, -1, dtype=np.int64)
        np.maximum.at(need, asg.unit_bin(enc.name), asg.sample_mb[u.sample])
        devs = []
        for r in range(D):
            rows = slice(r * M, (r + 1) * M)
            for c in range(copies):
                dev = ranks.encoder(ei, r, c)
                devs.append(dev)
                names[dev] = Role(enc.name, r, copy=c).device(copies)
                gpus[dev] = tp
                seconds = (ops.enc_fwd[enc.name][rows, c], ops.enc_bwd[enc.name][rows, c])
                chain(dev, encoder_actions(need[rows], P, trains), seconds)
        finish_groups[enc.name] = node[devs, int(trains)].ravel()

    # ---- messages: each from the compute that makes it to the first that needs it
    same_node = plan.gpus_per_replica <= hw.gpus_per_node
    lat = table.nbytes / hw.link(same_node)
    lat[table.kind >= ACT] /= plan.llm_tp  # a tensor-parallel stage sends its shard
    lat += hw.latency
    made = node[table.src, table.make[:, 0], table.make[:, 1]]
    needed = node[table.dst, table.need[:, 0], table.need[:, 1]]
    for a, b, t in zip(made.tolist(), needed.tolist(), lat.tolist()):
        g.transfer(a, b, t, hw)

    start, finish = g.longest_path()
    # ---- gradient all-reduce per module group, after its last backward on every replica
    end = float(finish.max(initial=0.0))
    for m, nodes in finish_groups.items():
        done = float(finish[nodes[nodes >= 0]].max(initial=0.0))
        done += ops.reduce[m]
        done += ops.step[m]
        end = max(end, done)
    dur = np.asarray(g.dur)
    dev_of = np.asarray(g.device)
    busy_arr = np.bincount(dev_of, weights=dur, minlength=len(names))
    gpu_seconds = float(np.dot(busy_arr, gpus))
    total = end * plan.world_size
    events = []
    if record_events:
        events = [
            (names[d], lab, float(s), float(f))
            for d, lab, s, f in zip(g.device, g.label, start, finish)
            if f > s
        ]
    return SimResult(
        iter_time=end,
        busy=dict(zip(names, busy_arr.tolist())),
        bubble_fraction=1.0 - gpu_seconds / total if total > 0 else 0.0,
        peak_deferred_tokens=float(deferred_tokens(batch, asg).max(initial=0.0)),
        samples=batch.n_samples,
        tokens=int(batch.llm_tokens.sum()),
        events=events,
        messages=table,
    )

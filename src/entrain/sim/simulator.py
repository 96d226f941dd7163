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
Deferral is therefore waiting, not magic. Transfers are what the runtime sends: one message
of embeddings per (encoder microbatch, LLM replica), taken by the first LLM microbatch that
needs it; gradients per (encoder microbatch, LLM microbatch); activations per microbatch and
stage. A transfer delays its receiver, or, where receives are blocking (gloo on CPU), it is
part of the receiver's busy time. After the last backward of a module, its gradients
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
from entrain.schedule.assignment import Assignment
from entrain.schedule.metrics import deferred_tokens
from entrain.schedule.parallel import ParallelPlan
from entrain.schedule.pipeline import encoder_actions, one_f_one_b
from entrain.sim.durations import bin_sum, op_seconds


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

    def node(self, device: int, dur: float, label: str) -> int:
        self.dur.append(dur)
        self.device.append(device)
        self.label.append(label)
        self.succ.append([])
        self.indeg.append(0)
        return len(self.dur) - 1

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
) -> SimResult:
    """Simulate one iteration of `asg` under `plan` on `hw`, in the batch's own cost unit."""
    D, M, P = asg.dp, asg.microbatches, plan.llm_pp
    if (plan.dp, plan.microbatches) != (D, M):
        raise ValueError(
            f"assignment is D={D}, M={M} but the plan is D={plan.dp}, M={plan.microbatches}"
        )
    plan.check_modules(tuple(batch.units))
    B = D * M
    ops = op_seconds(batch, asg, spec, plan, hw)  # every compute's duration (sim/durations.py)
    same_node = plan.gpus_per_replica <= hw.gpus_per_node
    link = hw.link(same_node)
    value_bytes = hw.bytes_per_value
    g = _Graph()
    names: list[str] = []
    gpus: list[int] = []

    def device(name: str, n_gpus: int) -> int:
        names.append(name)
        gpus.append(n_gpus)
        return len(names) - 1

    # ---- LLM stages: 1F1B per replica
    llm_bin = asg.llm_bin()
    tok_bin = bin_sum(llm_bin, batch.llm_tokens.astype(np.float64), B)
    f_llm, b_llm = ops.llm_fwd, ops.llm_bwd
    act_lat = tok_bin * spec.llm.hidden_size * value_bytes / plan.llm_tp / link + hw.latency
    F = np.zeros((P, B), dtype=np.int64)  # node id of forward of stage s, bin j
    Bk = np.zeros((P, B), dtype=np.int64)
    for r in range(D):
        for s in range(P):
            dev = device(f"llm.s{s}/r{r}", plan.llm_tp)
            prev = None
            for kind, k in one_f_one_b(P, s, M):
                j = r * M + k
                dur = f_llm[j] if kind == "F" else b_llm[j]
                node = g.node(dev, float(dur), f"{kind}{k}")
                (F if kind == "F" else Bk)[s, j] = node
                if prev is not None:
                    g.edge(prev, node)
                prev = node
    for j in range(B):
        for s in range(1, P):
            g.transfer(int(F[s - 1, j]), int(F[s, j]), float(act_lat[j]), hw)
            g.transfer(int(Bk[s, j]), int(Bk[s - 1, j]), float(act_lat[j]), hw)
        g.edge(int(F[P - 1, j]), int(Bk[P - 1, j]))

    # ---- encoders: decoupled microbatches feeding LLM stage 0 of any replica
    finish_groups: dict[str, list[int]] = {"llm": [int(x) for x in Bk[0]]}
    for enc in spec.encoders:
        u = batch.units[enc.name]
        tp, copies = plan.encoder_tp[enc.name], plan.encoder_dp.get(enc.name, 1)
        ebin = asg.unit_bin(enc.name)
        # the device is the encoder's copies together: a microbatch ends with its busiest copy
        f_enc, b_enc = ops.enc_fwd[enc.name].max(axis=1), ops.enc_bwd[enc.name].max(axis=1)
        trains = bool(u.bwd.sum() > 0) or not enc.frozen
        # LLM microbatch of each unit's sample; the last one each encoder bin feeds
        ubin = llm_bin[u.sample]
        need = np.full(B, -1, dtype=np.int64)
        np.maximum.at(need, ebin, asg.sample_mb[u.sample])
        eF = np.zeros(B, dtype=np.int64)
        eB = np.full(B, -1, dtype=np.int64)
        for r in range(D):
            dev = device(f"{enc.name}/r{r}", tp * copies)
            prev = None
            for kind, k in encoder_actions(need[r * M : (r + 1) * M], P, trains):
                j = r * M + k
                node = g.node(dev, float(f_enc[j] if kind == "F" else b_enc[j]), f"{kind}{k}")
                (eF if kind == "F" else eB)[j] = node
                if prev is not None:
                    g.edge(prev, node)
                prev = node
        # a trained encoder sends LLM-width embeddings; a frozen one its trunk's states
        values = (
            u.llm_tokens * spec.llm.hidden_size if trains else u.tokens * enc.encoder.hidden_size
        ).astype(np.float64)
        pair, inv = np.unique(ebin * B + ubin, return_inverse=True)
        pair_values = np.bincount(inv, weights=values)
        pair_lat = pair_values * value_bytes / link + hw.latency
        src, dst = np.divmod(pair, B)
        # embeddings: one message per (encoder bin, LLM replica), all of it there when the
        # first LLM microbatch of the replica that needs it starts
        msg, msg_inv = np.unique(src * D + dst // M, return_inverse=True)
        msg_lat = np.bincount(msg_inv, weights=pair_values) * value_bytes / link + hw.latency
        first = np.full(len(msg), B, dtype=np.int64)
        np.minimum.at(first, msg_inv, dst)
        for a, b, m in zip(src.tolist(), dst.tolist(), msg_inv.tolist()):
            if b == first[m]:
                g.transfer(int(eF[a]), int(F[0, b]), float(msg_lat[m]), hw)
            else:
                g.edge(int(eF[a]), int(F[0, b]))  # received along with the first
        # gradients: one message per (encoder bin, LLM bin)
        if trains:
            for a, b, t in zip(src.tolist(), dst.tolist(), pair_lat.tolist()):
                g.transfer(int(Bk[0, b]), int(eB[a]), t, hw)
        finish_groups[enc.name] = [int(x) for x in (eB if trains else eF)]

    start, finish = g.longest_path()
    # ---- gradient all-reduce per module group, after its last backward on every replica
    end = float(finish.max(initial=0.0))
    for m, nodes in finish_groups.items():
        done = float(finish[nodes].max(initial=0.0))
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
    )

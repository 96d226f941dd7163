"""How long each operation of one iteration takes on a device: the durations the simulator
gives its nodes, and the ones an emulated run's ranks sleep (runtime/emulate.py). One
function for both, so an emulated run and its simulation can differ only by what the
runtime really does (waiting, messages, its own overheads), which is what the emulation
measures.

Per LLM microbatch (replica r, microbatch k, bin r * M + k): the forward and backward of
its samples' LLM work split evenly over the P stages, plus the per-call constant when it
has a sample; every stage takes that long. Per encoder microbatch and copy: the work of the
units that copy encodes, plus the per-call constant when it has one. After a module's last
backward: the ring all-reduce of its gradients over its replicas and copies, then its
optimizer step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from entrain.cost.batch import CostedBatch
from entrain.cost.flops import module_params
from entrain.cost.hardware import Hardware
from entrain.models.spec import ModelSpec
from entrain.schedule.assignment import Assignment
from entrain.schedule.copies import unit_copies
from entrain.schedule.parallel import ParallelPlan


def bin_sum(bins: np.ndarray, weights: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(bins, weights=weights, minlength=n)


@dataclass(frozen=True)
class OpSeconds:
    """Seconds of every compute of one iteration, on one device of each module group."""

    dp: int
    microbatches: int
    llm_fwd: np.ndarray
    """(D * M,) forward of each LLM microbatch on each stage (bin r * M + k)."""
    llm_bwd: np.ndarray
    enc_fwd: dict[str, np.ndarray]
    """Encoder -> (D * M, copies): forward of each encoder microbatch on each copy."""
    enc_bwd: dict[str, np.ndarray]
    reduce: dict[str, float]
    """Module group ("llm" or an encoder) -> its gradient all-reduce after its last
    backward (0 with one replica, or frozen)."""
    step: dict[str, float]
    """Module group -> its optimizer step (0 when frozen or not measured)."""

    def compute(self, module: str, replica: int, kind: str, mb: int, copy: int = 0) -> float:
        """A forward ("F") or backward ("B") of microbatch `mb` of `module` ("llm" for any
        stage) in `replica`, on encoder copy `copy`."""
        j = replica * self.microbatches + mb
        if module == "llm":
            return float((self.llm_fwd if kind == "F" else self.llm_bwd)[j])
        return float((self.enc_fwd if kind == "F" else self.enc_bwd)[module][j, copy])

    def after_backward(self, module: str) -> float:
        """What a module group's rank spends after its last backward: the all-reduce of its
        gradients and its optimizer step."""
        return self.reduce[module] + self.step[module]

    def scaled(self, factor: float) -> OpSeconds:
        """Every duration times `factor` (an emulated run's --time-scale)."""
        return dataclasses.replace(
            self,
            llm_fwd=self.llm_fwd * factor,
            llm_bwd=self.llm_bwd * factor,
            enc_fwd={e: v * factor for e, v in self.enc_fwd.items()},
            enc_bwd={e: v * factor for e, v in self.enc_bwd.items()},
            reduce={m: v * factor for m, v in self.reduce.items()},
            step={m: v * factor for m, v in self.step.items()},
        )


def op_seconds(
    batch: CostedBatch, asg: Assignment, spec: ModelSpec, plan: ParallelPlan, hw: Hardware
) -> OpSeconds:
    """The durations of `asg`'s computes under `plan` on `hw`, in the batch's own cost unit."""
    D, M, P = asg.dp, asg.microbatches, plan.llm_pp
    B = D * M
    unit = batch.unit
    llm_bin = asg.llm_bin()
    runs = bin_sum(llm_bin, batch.llm_tokens.astype(np.float64), B) > 0
    call_f, call_b = batch.call_cost.get("llm", (0.0, 0.0))
    f_llm = bin_sum(llm_bin, batch.llm_fwd, B) + call_f * runs
    b_llm = bin_sum(llm_bin, batch.llm_bwd, B) + call_b * runs
    enc_fwd, enc_bwd = {}, {}
    for enc in spec.encoders:
        u = batch.units[enc.name]
        tp, copies = plan.encoder_tp[enc.name], plan.encoder_dp.get(enc.name, 1)
        # (bin, copy) of each unit, with the units split among the copies as the policy
        # splits them (schedule/copies.py)
        slot = asg.unit_bin(enc.name) * copies + unit_copies(batch, asg, enc.name, copies)
        runs = (np.bincount(slot, minlength=B * copies) > 0).reshape(B, copies)
        call_f, call_b = batch.call_cost.get(enc.name, (0.0, 0.0))
        for out, work, call in ((enc_fwd, u.fwd, call_f), (enc_bwd, u.bwd, call_b)):
            per_copy = bin_sum(slot, work, B * copies).reshape(B, copies)
            out[enc.name] = hw.seconds(per_copy + call * runs, unit, tp)
    params = module_params(spec)
    shards = {"llm": plan.llm_tp * P, **plan.encoder_tp}
    replicas = {"llm": D, **{e: D * plan.encoder_dp.get(e, 1) for e in plan.encoder_tp}}
    trains = {"llm": True, **{e.name: not e.frozen for e in spec.encoders}}
    dp_link = hw.link(plan.world_size <= hw.gpus_per_node)
    reduce, step = {}, {}
    for m in ["llm", *(e.name for e in spec.encoders)]:
        n_rep = replicas[m]
        reduce[m] = step[m] = 0.0
        if trains[m] and n_rep > 1:
            grad_bytes = params[m] / shards[m] * hw.bytes_per_value
            reduce[m] = 2 * (n_rep - 1) / n_rep * grad_bytes / dp_link
        if trains[m]:
            step[m] = hw.seconds(np.float64(batch.step_cost.get(m, 0.0)) / shards[m], unit, 1)
    return OpSeconds(
        dp=D,
        microbatches=M,
        llm_fwd=hw.seconds(f_llm / P, unit, plan.llm_tp),
        llm_bwd=hw.seconds(b_llm / P, unit, plan.llm_tp),
        enc_fwd=enc_fwd,
        enc_bwd=enc_bwd,
        reduce=reduce,
        step=step,
    )

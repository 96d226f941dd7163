"""What every rank derives, identically, from one global batch and its assignment: which
units each encoder microbatch holds, where their embeddings go, which samples each LLM
microbatch runs, and the loss normalizer. Plain Python and numpy, no communication."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from entrain.cost.batch import CostedBatch, unit_locations
from entrain.models.spec import ModelSpec
from entrain.program.messages import MessageTable, message_table
from entrain.schedule.assignment import Assignment
from entrain.schedule.copies import unit_copies
from entrain.workload.columnar import Workload


@dataclass
class UnitRef:
    """One encoder unit: its sample (index in the batch), which item of the sample's
    modality list it comes from, and which chunk of that item it is."""

    encoder: str
    index: int
    sample: int
    modality: str
    item: int
    chunk: int


@dataclass
class IterationPlan:
    spec: ModelSpec
    asg: Assignment
    llm_stages: int
    n_samples: int
    units: dict[str, list[UnitRef]]
    prefix: list[list[tuple[str, int]]]
    """Per sample, its units in sequence order (encoders in spec order)."""
    enc_mb: dict[tuple[str, int, int], list[int]] = field(default_factory=dict)
    """(encoder, replica, microbatch) -> unit indices."""
    llm_mb: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    """(replica, microbatch) -> sample indices."""
    unit_rows: dict[str, list[int]] = field(default_factory=dict)
    """Per encoder and unit: rows of the tensor its encoder sends (LLM tokens when it
    trains, its own positions when frozen and the projector runs on the LLM side)."""
    seq_rows: list[int] = field(default_factory=list)
    """Per sample: its LLM sequence length."""
    value_bytes: int = 4
    """Bytes of one value on the wire (4 for fp32 messages, 2 for bf16)."""
    unit_copy: dict[str, list[int]] = field(default_factory=dict)
    """Per encoder and unit: which of the encoder's copies in its replica encodes it."""
    batch: CostedBatch | None = None
    copies: dict[str, int] = field(default_factory=dict)
    messages: MessageTable | None = None
    """Every message of the step (program/messages.py): the transfers every rank holds the
    step to, and what the simulator times."""

    @staticmethod
    def build(
        batch: CostedBatch,
        asg: Assignment,
        spec: ModelSpec,
        llm_stages: int,
        samples: Workload,
        value_bytes: int = 4,
        copies: dict[str, int] | None = None,
    ) -> IterationPlan:
        """`samples`: the step's samples, the workload `batch` was costed from. `copies`:
        encoders on several ranks per replica (ParallelPlan.encoder_dp); each of their
        microbatches' units are split among the copies by the policy's rule."""
        units: dict[str, list[UnitRef]] = {}
        prefix: list[list[tuple[str, int]]] = [[] for _ in range(batch.n_samples)]
        for enc in spec.encoders:
            table = batch.units[enc.name]
            modality, item, chunk = unit_locations(enc, samples, table)
            refs = [
                UnitRef(enc.name, i, s, str(m), int(x), int(c))
                for i, (s, m, x, c) in enumerate(zip(table.sample.tolist(), modality, item, chunk))
            ]
            for ref in refs:
                prefix[ref.sample].append((enc.name, ref.index))
            units[enc.name] = refs
        plan = IterationPlan(
            spec=spec,
            asg=asg,
            llm_stages=llm_stages,
            n_samples=batch.n_samples,
            units=units,
            prefix=prefix,
            unit_rows={
                e.name: (batch.units[e.name].tokens if e.frozen else batch.units[e.name].llm_tokens)
                .astype(int)
                .tolist()
                for e in spec.encoders
            },
            seq_rows=batch.llm_tokens.astype(int).tolist(),
            value_bytes=value_bytes,
            batch=batch,
            copies=dict(copies or {}),
        )
        for e, refs in units.items():
            for u in refs:
                key = (e, int(asg.unit_replica[e][u.index]), int(asg.unit_mb[e][u.index]))
                plan.enc_mb.setdefault(key, []).append(u.index)
        for s in range(batch.n_samples):
            plan.llm_mb.setdefault((int(asg.sample_replica[s]), int(asg.sample_mb[s])), []).append(
                s
            )
        for e in units:  # the policy's own split (schedule/copies.py), as the simulator's
            plan.unit_copy[e] = unit_copies(batch, asg, e, plan.copies.get(e, 1)).tolist()
        plan.messages = plan.message_table()
        return plan

    def message_table(self, width: int | None = None) -> MessageTable:
        """The step's messages, `width` values a row (None: the model's widths; an emulated
        run narrows them)."""
        return message_table(
            self.batch, self.asg, self.spec, self.llm_stages, self.copies, self.value_bytes, width
        )

    def unit_dest(self, encoder: str, unit: int) -> tuple[int, int]:
        """(replica, LLM microbatch) of the sample the unit belongs to."""
        s = self.units[encoder][unit].sample
        return int(self.asg.sample_replica[s]), int(self.asg.sample_mb[s])

    def copy_units(self, encoder: str, replica: int, mb: int, copy: int = 0) -> list[int]:
        """The units of encoder microbatch (replica, mb) that `copy` encodes."""
        owner = self.unit_copy.get(encoder)
        units = self.enc_mb.get((encoder, replica, mb), [])
        return units if not owner else [u for u in units if owner[u] == copy]

    def need(self, encoder: str, replica: int) -> np.ndarray:
        """Last LLM microbatch fed by each encoder microbatch of this replica (-1: none)."""
        M = self.asg.microbatches
        out = np.full(M, -1, dtype=np.int64)
        for k in range(M):
            for u in self.enc_mb.get((encoder, replica, k), []):
                out[k] = max(out[k], self.unit_dest(encoder, u)[1])
        return out

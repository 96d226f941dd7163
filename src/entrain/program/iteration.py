"""What every rank derives, identically, from one global batch and its assignment: which
units each encoder microbatch holds, where their embeddings go, which samples each LLM
microbatch runs, and the loss normalizer. Plain Python and numpy, no communication."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from entrain.cost.batch import CostedBatch
from entrain.models.spec import ModelSpec
from entrain.program.messages import capacity
from entrain.schedule.assignment import Assignment
from entrain.schedule.copies import unit_copies


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

    @staticmethod
    def build(
        batch: CostedBatch,
        asg: Assignment,
        spec: ModelSpec,
        llm_stages: int,
        item_modality,
        value_bytes: int = 4,
        copies: dict[str, int] | None = None,
    ) -> IterationPlan:
        """`copies`: encoders on several ranks per replica (ParallelPlan.encoder_dp); each of
        their microbatches' units are split among the copies by the policy's rule."""
        units: dict[str, list[UnitRef]] = {}
        prefix: list[list[tuple[str, int]]] = [[] for _ in range(batch.n_samples)]
        for enc in spec.encoders:
            table = batch.units[enc.name]
            refs = []
            first_unit_of_item: dict[int, int] = {}
            for i, (s, item) in enumerate(zip(table.sample.tolist(), table.item.tolist())):
                first_unit_of_item.setdefault(item, i)
                modality, local = item_modality(enc, int(s), int(item))
                refs.append(
                    UnitRef(enc.name, i, int(s), modality, local, i - first_unit_of_item[item])
                )
                prefix[int(s)].append((enc.name, i))
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
        )
        for e, refs in units.items():
            for u in refs:
                key = (e, int(asg.unit_replica[e][u.index]), int(asg.unit_mb[e][u.index]))
                plan.enc_mb.setdefault(key, []).append(u.index)
        for s in range(batch.n_samples):
            plan.llm_mb.setdefault((int(asg.sample_replica[s]), int(asg.sample_mb[s])), []).append(
                s
            )
        copies = copies or {}
        for e in units:  # the policy's own split (schedule/copies.py), as the simulator's
            plan.unit_copy[e] = unit_copies(batch, asg, e, copies.get(e, 1)).tolist()
        return plan

    def embed_cap(self, encoder: str, units: list[int]) -> int:
        """Bytes of a transfer of these units' embeddings (or their gradients), at most."""
        enc = next(e for e in self.spec.encoders if e.name == encoder)
        width = enc.encoder.hidden_size if enc.frozen else self.spec.llm.hidden_size
        rows = [self.unit_rows[encoder][u] for u in units]
        return capacity(len(units), rows, width, self.value_bytes)

    def act_cap(self, samples: list[int]) -> int:
        """Bytes of a transfer of these samples' activations (or their gradients), at most."""
        rows = [self.seq_rows[s] for s in samples]
        return capacity(len(samples), rows, self.spec.llm.hidden_size, self.value_bytes)

    def unit_dest(self, encoder: str, unit: int) -> tuple[int, int]:
        """(replica, LLM microbatch) of the sample the unit belongs to."""
        s = self.units[encoder][unit].sample
        return int(self.asg.sample_replica[s]), int(self.asg.sample_mb[s])

    def copy_units(self, encoder: str, replica: int, mb: int, copy: int = 0) -> list[int]:
        """The units of encoder microbatch (replica, mb) that `copy` encodes."""
        owner = self.unit_copy.get(encoder)
        units = self.enc_mb.get((encoder, replica, mb), [])
        return units if not owner else [u for u in units if owner[u] == copy]

    def sends_of(self, encoder: str, replica: int, mb: int, copy: int = 0) -> dict[int, list[int]]:
        """Units `copy` encodes in encoder microbatch (replica, mb), grouped by the LLM
        replica they feed."""
        out: dict[int, list[int]] = defaultdict(list)
        for u in self.copy_units(encoder, replica, mb, copy):
            out[self.unit_dest(encoder, u)[0]].append(u)
        return dict(out)

    def grad_sources(
        self, encoder: str, replica: int, mb: int, copy: int = 0
    ) -> dict[tuple[int, int], list[int]]:
        """Units `copy` encodes in encoder microbatch (replica, mb), grouped by the LLM
        (replica, microbatch) that returns their gradients."""
        out: dict[tuple[int, int], list[int]] = defaultdict(list)
        for u in self.copy_units(encoder, replica, mb, copy):
            out[self.unit_dest(encoder, u)].append(u)
        return dict(out)

    def embed_sources(self, replica: int, mb: int) -> dict[tuple[str, int, int, int], list[int]]:
        """For LLM microbatch (replica, mb): the encoder microbatches and copies
        (encoder, replica, k, copy) holding its samples' units, with those units."""
        out: dict[tuple[str, int, int, int], list[int]] = defaultdict(list)
        for s in self.llm_mb.get((replica, mb), []):
            for e, u in self.prefix[s]:
                key = (
                    e,
                    int(self.asg.unit_replica[e][u]),
                    int(self.asg.unit_mb[e][u]),
                    self.unit_copy[e][u] if self.unit_copy.get(e) else 0,
                )
                out[key].append(u)
        return dict(out)

    def need(self, encoder: str, replica: int) -> np.ndarray:
        """Last LLM microbatch fed by each encoder microbatch of this replica (-1: none)."""
        M = self.asg.microbatches
        out = np.full(M, -1, dtype=np.int64)
        for k in range(M):
            for u in self.enc_mb.get((encoder, replica, k), []):
                out[k] = max(out[k], self.unit_dest(encoder, u)[1])
        return out

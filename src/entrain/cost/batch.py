"""A global batch with its costs: the input every scheduling policy takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from entrain.cost.flops import CostModel, analytic_cost_model
from entrain.cost.tokens import audio_units, vision_units
from entrain.models.spec import ModelSpec, VisionSpec
from entrain.workload.columnar import Workload

COST_UNITS = ("flop", "s")


@dataclass(frozen=True, eq=False)
class UnitTable:
    """One encoder's indivisible units in a batch, sorted by sample."""

    sample: np.ndarray  # (U,) int64, owning sample
    item: np.ndarray  # (U,) int64, owning item (numbered per encoder within the batch)
    tokens: np.ndarray  # (U,) int64, encoder positions
    llm_tokens: np.ndarray  # (U,) int64, tokens the unit adds to its sample's LLM sequence
    fwd: np.ndarray  # (U,) float64, forward cost
    bwd: np.ndarray  # (U,) float64, backward cost (0 for a frozen encoder)

    @cached_property
    def cost(self) -> np.ndarray:
        """Forward + backward: the unit's work when balancing (computed once: the policies
        read it many times per batch; the arrays are not changed after costing)."""
        return self.fwd + self.bwd

    def __len__(self) -> int:
        return int(self.sample.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.item.max()) + 1 if len(self) else 0


@dataclass(frozen=True, eq=False)
class CostedBatch:
    """Per-sample LLM cost and per-unit encoder costs of one global batch."""

    n_samples: int
    text_tokens: np.ndarray  # (N,) int64
    llm_tokens: np.ndarray  # (N,) int64, text + projected modality tokens
    llm_fwd: np.ndarray  # (N,) float64, forward cost of the sample on the LLM side
    llm_bwd: np.ndarray  # (N,) float64
    units: dict[str, UnitTable]  # encoder name -> its units
    call_cost: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Module -> (forward, backward) cost of one run on a non-empty microbatch."""
    step_cost: dict[str, float] = field(default_factory=dict)
    """Module -> cost of its optimizer step, once per iteration."""
    unit: str = "flop"
    """What the costs count: "flop" (analytic model) or "s" (measured on one GPU)."""

    def __post_init__(self) -> None:
        if self.unit not in COST_UNITS:
            raise CostUnitError(f"unknown cost unit {self.unit!r} (expected one of {COST_UNITS})")

    @cached_property
    def llm_cost(self) -> np.ndarray:
        """Forward + backward LLM-side work of each sample (computed once)."""
        return self.llm_fwd + self.llm_bwd

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(self.units) + ("llm",)

    def module_cost_per_sample(self, module: str) -> np.ndarray:
        """Cost of `module` for each sample when a sample's units stay together, shape (N,)."""
        if module == "llm":
            return self.llm_cost
        u = self.units[module]
        return np.bincount(u.sample, weights=u.cost, minlength=self.n_samples)

    @staticmethod
    def concat(batches: list[CostedBatch]) -> CostedBatch:
        """One pool of the samples of several batches (for statistics over many samples)."""
        unit = common_unit(batches)
        offsets = np.cumsum([0] + [b.n_samples for b in batches[:-1]])
        units = {}
        for e in batches[0].units:
            parts = [b.units[e] for b in batches]
            item_off = np.cumsum([0] + [p.n_items for p in parts[:-1]])
            units[e] = UnitTable(
                np.concatenate([p.sample + o for p, o in zip(parts, offsets)]),
                np.concatenate([p.item + o for p, o in zip(parts, item_off)]),
                *(
                    np.concatenate([getattr(p, f) for p in parts])
                    for f in ("tokens", "llm_tokens", "fwd", "bwd")
                ),
            )
        return CostedBatch(
            n_samples=sum(b.n_samples for b in batches),
            text_tokens=np.concatenate([b.text_tokens for b in batches]),
            llm_tokens=np.concatenate([b.llm_tokens for b in batches]),
            llm_fwd=np.concatenate([b.llm_fwd for b in batches]),
            llm_bwd=np.concatenate([b.llm_bwd for b in batches]),
            units=units,
            call_cost=batches[0].call_cost,
            step_cost=batches[0].step_cost,
            unit=unit,
        )

    def cost_matrix(self) -> np.ndarray:
        """(N, modules) coupled cost per sample, module order as `modules`."""
        return np.stack([self.module_cost_per_sample(m) for m in self.modules], axis=1)


class CostUnitError(ValueError):
    """Costs in different units (FLOPs and measured seconds) met in one computation."""


def common_unit(batches: list[CostedBatch]) -> str:
    """The one cost unit of `batches`; mixing FLOP-costed and second-costed batches would
    silently add or compare numbers nine orders of magnitude apart, so it is an error."""
    units = {b.unit for b in batches}
    if len(units) != 1:
        raise CostUnitError(
            f"costed batches mix cost units {sorted(units)}: cost every batch with one cost "
            "model (analytic FLOPs or one profile)"
        )
    return units.pop()


class MissingEncoderError(ValueError):
    """The workload has items of a modality the model has no encoder for."""


def _encoder_units(enc, workload: Workload) -> UnitTable:
    parts = []
    item_base = 0
    for modality in enc.modalities:
        t = workload.items[modality]
        if not len(t):
            continue
        if isinstance(enc, VisionSpec):
            n_units, tok, llm = vision_units(enc, modality, t.size)
        else:
            n_units, tok, llm = audio_units(enc, t.size[:, 0])
        item = np.repeat(np.arange(len(t)), n_units)
        parts.append((t.sample[item], item + item_base, tok, llm))
        item_base += len(t)
    if not parts:
        z = np.zeros(0, np.int64)
        return UnitTable(z, z, z, z, np.zeros(0), np.zeros(0))
    sample, item, tok, llm = (np.concatenate(c) for c in zip(*parts))
    order = np.argsort(sample, kind="stable")
    return UnitTable(sample[order], item[order], tok[order], llm[order], np.zeros(0), np.zeros(0))


def cost_batch(workload: Workload, spec: ModelSpec, model: CostModel | None = None) -> CostedBatch:
    """Units, tokens and costs of every module for one global batch."""
    model = model or analytic_cost_model(spec)
    for modality, table in workload.items.items():
        if len(table) and spec.encoder_for(modality) is None:
            raise MissingEncoderError(
                f"the workload has {len(table)} {modality} item(s) but model {spec.name!r} has no "
                f"encoder for {modality!r} (its encoders take: "
                f"{', '.join(m for e in spec.encoders for m in e.modalities) or 'nothing'})"
            )
    n = len(workload)
    units: dict[str, UnitTable] = {}
    llm_tokens = workload.text_tokens.astype(np.int64).copy()
    proj_fwd, proj_bwd = np.zeros(n), np.zeros(n)
    for enc in spec.encoders:
        u = _encoder_units(enc, workload)
        c = model[enc.name]
        u = UnitTable(
            u.sample, u.item, u.tokens, u.llm_tokens, c.forward(u.tokens), c.backward(u.tokens)
        )
        units[enc.name] = u
        llm_tokens += np.bincount(u.sample, weights=u.llm_tokens, minlength=n).astype(np.int64)
        if enc.name in model.llm_projectors:  # a frozen encoder's projector runs with the LLM
            p = model.llm_projectors[enc.name]
            proj_fwd += np.bincount(u.sample, weights=p.forward(u.tokens), minlength=n)
            proj_bwd += np.bincount(u.sample, weights=p.backward(u.tokens), minlength=n)
    llm = model["llm"]
    return CostedBatch(
        n_samples=n,
        text_tokens=workload.text_tokens.astype(np.int64),
        llm_tokens=llm_tokens,
        llm_fwd=llm.forward(llm_tokens) + proj_fwd,
        llm_bwd=llm.backward(llm_tokens) + proj_bwd,
        units=units,
        call_cost={m: (c.forward.call, c.backward.call) for m, c in model.modules.items()},
        step_cost=dict(model.step),
        unit=model.unit,
    )


def unit_locations(
    enc, workload: Workload, table: UnitTable
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each unit of encoder `enc` comes from in `workload` (the batch `table` was
    costed from): its modality, the item's index in its sample's list of that modality, and
    which chunk of the item it is (a video's frame group, an audio clip's window; 0 for an
    image). The one place that inverts cost_batch's numbering: it numbers an encoder's items
    across its modalities in spec order, all items of one modality before the next, and
    keeps the units of one item contiguous (one sample, sorted stably by sample), so a
    unit's chunk is its distance from its item's first unit."""
    names, local = [], []
    for m in enc.modalities:
        t = workload.items[m]
        first_of_sample = np.searchsorted(t.sample, t.sample)  # (I,) first item of the owner
        local.append(np.arange(len(t)) - first_of_sample)
        names.append(np.full(len(t), m, dtype=object))
    item_modality = np.concatenate(names) if names else np.zeros(0, object)
    item_local = np.concatenate(local) if local else np.zeros(0, np.int64)
    _, first_unit, inverse = np.unique(table.item, return_index=True, return_inverse=True)
    chunk = np.arange(len(table)) - first_unit[inverse]
    return item_modality[table.item], item_local[table.item], chunk

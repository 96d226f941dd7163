"""An assignment: where every sample's LLM work and every encoder unit runs in one iteration.

It is plain data (integer arrays) so the simulator and the runtime read the same thing, and a
policy's output can be checked, saved and broadcast without pickling objects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from entrain.cost.batch import CostedBatch


@dataclass(frozen=True, eq=False)
class Assignment:
    """Placement of one global batch on D replicas x M microbatches.

    An encoder unit may run on another replica's encoder and in an earlier microbatch than
    its sample's LLM work (never later: the LLM needs its embeddings).
    """

    dp: int
    microbatches: int
    sample_replica: np.ndarray  # (N,) int64
    sample_mb: np.ndarray  # (N,) int64, the sample's LLM microbatch
    unit_replica: dict[str, np.ndarray]  # encoder -> (U,) int64
    unit_mb: dict[str, np.ndarray]  # encoder -> (U,) int64
    copy_rule: str = "unit"
    """How an encoder microbatch's units are split over the encoder's copies in a replica
    (schedule/copies.py): by "sample", "item" or "unit"."""

    @property
    def n_bins(self) -> int:
        return self.dp * self.microbatches

    def llm_bin(self) -> np.ndarray:
        """Flat microbatch index r*M + k of each sample's LLM work."""
        return self.sample_replica * self.microbatches + self.sample_mb

    def unit_bin(self, encoder: str) -> np.ndarray:
        """Flat microbatch index r*M + k of each unit's encoder work."""
        return self.unit_replica[encoder] * self.microbatches + self.unit_mb[encoder]

    @staticmethod
    def coupled(
        batch: CostedBatch, dp: int, microbatches: int, sample_bin: np.ndarray
    ) -> Assignment:
        """Every unit runs with its sample: the assignment of all non-decoupled policies."""
        sample_bin = np.asarray(sample_bin, dtype=np.int64)
        rep, mb = np.divmod(sample_bin, microbatches)
        return Assignment(
            dp=dp,
            microbatches=microbatches,
            sample_replica=rep,
            sample_mb=mb,
            unit_replica={e: rep[u.sample] for e, u in batch.units.items()},
            unit_mb={e: mb[u.sample] for e, u in batch.units.items()},
            copy_rule="sample",  # data-parallel encoders: each copy its share of the samples
        )

    def violations(self, batch: CostedBatch) -> list[str]:
        """Every broken invariant, in words (empty when the assignment is valid)."""
        out = []
        n, D, M = batch.n_samples, self.dp, self.microbatches
        for name, arr, size, hi in [
            ("sample_replica", self.sample_replica, n, D),
            ("sample_mb", self.sample_mb, n, M),
        ]:
            if arr.shape != (size,):
                out.append(f"{name} has shape {arr.shape}, expected ({size},)")
            elif size and (arr.min() < 0 or arr.max() >= hi):
                out.append(f"{name} out of range [0, {hi})")
        if out:
            return out
        for e, u in batch.units.items():
            if e not in self.unit_replica or e not in self.unit_mb:
                out.append(f"encoder {e!r} has no unit placement")
                continue
            r, k = self.unit_replica[e], self.unit_mb[e]
            if r.shape != (len(u),) or k.shape != (len(u),):
                out.append(f"{e}: placement has shape {r.shape}/{k.shape}, expected ({len(u)},)")
                continue
            if len(u) and (r.min() < 0 or r.max() >= D or k.min() < 0 or k.max() >= M):
                out.append(f"{e}: unit placement out of range")
                continue
            late = k > self.sample_mb[u.sample]
            if late.any():
                out.append(
                    f"{e}: {int(late.sum())} unit(s) encoded after their sample's LLM microbatch"
                )
        return out

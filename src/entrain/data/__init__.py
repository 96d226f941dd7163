"""Entrain's data side for users: readers that turn real data sets into manifests
(`entrain.data.readers`) and a sampler for a torch DataLoader (`EntrainBatchSampler`).

The sampler is imported on first use: it needs torch, the readers do not.
"""

from __future__ import annotations

__all__ = ["EncoderUnit", "EntrainBatchSampler", "IterationAssignment"]


def __getattr__(name: str):
    if name in __all__:
        from entrain.data import sampler

        return getattr(sampler, name)
    raise AttributeError(f"module 'entrain.data' has no attribute {name!r}")

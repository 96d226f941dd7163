"""Entrain's batching for users' own training loops: a sampler for a torch DataLoader."""

from entrain.data.sampler import EncoderUnit, EntrainBatchSampler, IterationAssignment

__all__ = ["EncoderUnit", "EntrainBatchSampler", "IterationAssignment"]

"""Cost model: tokens per unit from the spec, FLOPs per unit, and costed batches."""

from entrain.cost.batch import CostedBatch, MissingEncoderError, UnitTable, cost_batch
from entrain.cost.flops import (
    CostCoeffs,
    CostModel,
    ModuleCost,
    analytic_cost_model,
    transformer_flops,
)

__all__ = [
    "CostCoeffs",
    "CostModel",
    "ModuleCost",
    "CostedBatch",
    "MissingEncoderError",
    "UnitTable",
    "analytic_cost_model",
    "cost_batch",
    "transformer_flops",
]

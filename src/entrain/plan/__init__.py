"""Static planning and the dynamic oracle (numpy only; plans are evaluated with sim/)."""

from entrain.plan.memory import plan_memory
from entrain.plan.planner import Planner, PlannerConfig, PlanResult, enumerate_plans, estimate_time

__all__ = [
    "PlanResult",
    "Planner",
    "PlannerConfig",
    "enumerate_plans",
    "estimate_time",
    "plan_memory",
]

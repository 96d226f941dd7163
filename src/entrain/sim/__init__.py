"""Discrete-event simulation of one training iteration (numpy only)."""

from entrain.sim.simulator import SimResult, simulate

__all__ = ["SimResult", "simulate"]

"""Hardware profiles: what turns FLOPs and bytes into seconds in the simulator.

Peak numbers are the vendors' dense BF16 datasheet values; `efficiency` is the fraction of
peak a training step reaches in practice (model FLOPs utilization). A measured profile
(`entrain profile`) replaces both with timings taken on the real machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """One GPU type and its interconnect."""

    name: str
    peak_flops: float
    """Dense BF16 FLOP/s of one GPU."""
    efficiency: float = 0.45
    """Fraction of peak reached by training kernels."""
    memory_bytes: float
    """Memory of one GPU."""
    gpus_per_node: int = 8
    intra_node_bw: float
    """Bytes/s one GPU sends to another in its node (NVLink)."""
    inter_node_bw: float
    """Bytes/s one GPU sends across nodes (its NIC share)."""
    latency: float = 10e-6
    """Seconds added to every point-to-point transfer."""
    send_cost: float = 0.0
    """Seconds a send occupies the sender (packing, posting); charged with blocking p2p."""
    tp_scaling: float = 0.92
    """Efficiency kept per doubling of tensor parallelism (its all-reduces cost time)."""
    bytes_per_value: int = 2
    """Bytes of one activation, embedding or gradient value on the wire (bf16; the CPU
    runtime sends fp32)."""
    blocking_p2p: bool = False
    """True when a receive occupies the receiving device (gloo on CPU: the copy runs on the
    core that waits for it); False when transfers overlap compute (NCCL on its own stream)."""

    def __post_init__(self) -> None:
        for name in ("peak_flops", "efficiency", "memory_bytes", "intra_node_bw", "inter_node_bw"):
            if getattr(self, name) <= 0:
                raise ValueError(f"hardware.{name} must be positive")

    def speedup(self, tp: int) -> float:
        """How much faster a TP group of `tp` GPUs runs than one GPU."""
        return tp * self.tp_scaling ** math.log2(tp)

    def flops(self, tp: int = 1) -> float:
        """Achieved FLOP/s of a TP group."""
        return self.peak_flops * self.efficiency * self.speedup(tp)

    def seconds(self, work, unit: str, tp: int = 1):
        """Seconds of `work` on a TP group: FLOPs over the achieved FLOP/s, or seconds
        measured on one GPU over the TP speed-up. `unit` is the costed batch's own, so a
        batch costed in FLOPs can never be read as seconds."""
        if unit == "flop":
            return work / self.flops(tp)
        if unit == "s":
            return work / self.speedup(tp)
        raise ValueError(f"unknown cost unit {unit!r} (expected 'flop' or 's')")

    def link(self, same_node: bool) -> float:
        return self.intra_node_bw if same_node else self.inter_node_bw


HARDWARE: dict[str, Hardware] = {
    # NVIDIA H100 SXM: 989 TFLOP/s dense BF16, 80 GB, NVLink 4 (450 GB/s each way), 400 Gb/s NIC
    "h100": Hardware(
        name="h100", peak_flops=989e12, memory_bytes=80e9, intra_node_bw=450e9, inter_node_bw=50e9
    ),
    # NVIDIA H200 SXM: same compute, 141 GB
    "h200": Hardware(
        name="h200", peak_flops=989e12, memory_bytes=141e9, intra_node_bw=450e9, inter_node_bw=50e9
    ),
    # NVIDIA A100 SXM 80GB: 312 TFLOP/s dense BF16, NVLink 3 (300 GB/s each way), 200 Gb/s NIC
    "a100": Hardware(
        name="a100", peak_flops=312e12, memory_bytes=80e9, intra_node_bw=300e9, inter_node_bw=25e9
    ),
}


def get_hardware(name: str) -> Hardware:
    if name not in HARDWARE:
        raise ValueError(f"unknown hardware {name!r}; choose one of {', '.join(HARDWARE)}")
    return HARDWARE[name]

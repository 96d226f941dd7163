"""What `--device emulate[:NAME|PROFILE.json]` stands for: the hardware and cost model whose
seconds an emulated run's ranks sleep (runtime/emulate.py), and that its replay simulates
with (sim/replay.py). Torch-free: the launcher, the config and the replay read it.

`emulate` alone is an H100; `emulate:a100` any preset of cost/hardware.py (the analytic
FLOPs model over its achieved FLOP/s); `emulate:PROFILE.json` a measured profile's costs in
seconds and its machine (`entrain profile`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from entrain.cost.flops import CostModel
from entrain.cost.hardware import HARDWARE, Hardware
from entrain.cost.profile import ProfileError, load_profile
from entrain.models.spec import ModelSpec

EMULATE = "emulate"
DEFAULT_HARDWARE = "h100"


def is_emulated(device: str) -> bool:
    """Whether a --device names the emulated device (its argument is not checked here)."""
    return device == EMULATE or device.startswith(EMULATE + ":")


@dataclass(frozen=True)
class EmulatedDevice:
    """The device an emulated run pretends to run on."""

    name: str
    """A hardware preset's name, or the profile's path."""
    hardware: Hardware
    cost_model: CostModel | None
    """None: the analytic FLOPs model (a hardware preset); else the profile's, in seconds."""

    @property
    def profile(self) -> str | None:
        """The profile's path (None for a hardware preset)."""
        return None if self.name in HARDWARE else self.name


def emulated_device(device: str, spec: ModelSpec | None = None) -> EmulatedDevice | None:
    """The device `--device emulate[:NAME|PROFILE.json]` names (None when `device` is not
    emulated). An unknown name, or a profile that cannot be read, is a ValueError of one
    line naming the flag; given `spec`, a profile of another model is too."""
    if not is_emulated(device):
        return None
    what = device.partition(":")[2] or DEFAULT_HARDWARE
    if what in HARDWARE:
        return EmulatedDevice(what, HARDWARE[what], None)
    if not os.path.isfile(what):
        raise ValueError(
            f"--device {device}: {what!r} is neither a hardware preset "
            f"({', '.join(HARDWARE)}) nor a profile file (entrain profile -o PROFILE.json)"
        )
    try:
        profile = load_profile(what, spec)
    except ProfileError as e:
        raise ProfileError(f"--device {device}: {e}") from None
    if profile.p2p is None:
        raise ProfileError(
            f"--device {device}: the profile has no link measurement (profiled with one "
            "process); profile with --nproc 2 or more"
        )
    return EmulatedDevice(what, profile.hardware(), profile.cost_model())


def absolute(device: str) -> str:
    """The same --device with a profile's path made absolute (what config.json records, so
    a replay finds the profile from any folder)."""
    if not is_emulated(device):
        return device
    what = device.partition(":")[2]
    if what and what not in HARDWARE and os.path.exists(what):
        return f"{EMULATE}:{os.path.abspath(what)}"
    return device

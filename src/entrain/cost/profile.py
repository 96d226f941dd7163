"""A measured profile (`entrain profile -o profile.json`): fitted per-module costs in seconds
and the hardware they were taken on. The simulator and planner take it instead of the FLOPs
model (`--profile`). Torch-free: reading a profile must not need the runtime.

The file is plain JSON:

    {"entrain_profile": 1, "model": "tiny", "modules": {"vision": {"forward": {"a": ..,
     "b": .., "c0": .., "call": .., "rel_rms": .., "max_rel": .., "runs": ..}, "backward":
     {..}}, "llm": {..}}, "llm_projectors": {..}, "step": {"vision": s, "llm": s},
     "hardware": {"name": .., "flops": .., "memory_bytes": .., "devices": ..,
     "p2p": {"latency": s, "bandwidth": bytes/s, ...}, "blocking_p2p": true,
     "bytes_per_value": 4}, "host": {..}}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from entrain.cost.fit import TERMS, FitResult
from entrain.cost.flops import CostCoeffs, CostModel, ModuleCost
from entrain.cost.hardware import Hardware
from entrain.models.spec import ModelSpec

FORMAT_VERSION = 1


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class P2PFit:
    """Receive time of a message of n bytes: latency + n / bandwidth; a send's time on the
    sender: `send`."""

    latency: float
    bandwidth: float
    send: float = 0.0
    rel_rms: float = 0.0
    runs: int = 0


@dataclass
class Profile:
    """Everything one `entrain profile` run measured."""

    model: str
    modules: dict[str, dict[str, FitResult]]
    """Module -> {"forward": fit, "backward": fit} (a frozen encoder has no backward)."""
    llm_projectors: dict[str, dict[str, FitResult]] = field(default_factory=dict)
    step: dict[str, float] = field(default_factory=dict)
    """Module -> seconds of its optimizer step."""
    flops: float = 0.0
    """Achieved FLOP/s over every timed run (the FLOPs model's count over measured time)."""
    memory_bytes: float = 0.0
    """Memory of one device (one process's share of RAM on CPU)."""
    devices: int = 1
    """Processes (GPUs) that took part: the link was measured between two of them."""
    p2p: P2PFit | None = None
    blocking_p2p: bool = True
    bytes_per_value: int = 4
    host: dict = field(default_factory=dict)

    def cost_model(self) -> CostModel:
        """Costs in seconds on one device of the profiled kind."""

        def module(fits: dict[str, FitResult]) -> ModuleCost:
            back = fits.get("backward")
            return ModuleCost(fits["forward"].coeffs, back.coeffs if back else CostCoeffs(0.0))

        return CostModel(
            modules={m: module(f) for m, f in self.modules.items()},
            llm_projectors={m: module(f) for m, f in self.llm_projectors.items()},
            unit="s",
            step=dict(self.step),
        )

    def hardware(self, fallback: Hardware | None = None) -> Hardware:
        """The measured machine. Without a p2p measurement (a one-process profile) the link
        comes from `fallback`."""
        if self.p2p is None and fallback is None:
            raise ProfileError(
                "the profile has no p2p measurement (profiled with one process); "
                "give a --hardware preset for the links or profile with --nproc 2"
            )
        bw = self.p2p.bandwidth if self.p2p else fallback.intra_node_bw
        return Hardware(
            name=f"profile:{self.host.get('device', 'measured')}",
            peak_flops=self.flops,
            efficiency=1.0,
            memory_bytes=self.memory_bytes,
            gpus_per_node=max(self.devices, 1),
            intra_node_bw=bw,
            inter_node_bw=bw if self.p2p else fallback.inter_node_bw,
            latency=self.p2p.latency if self.p2p else fallback.latency,
            send_cost=self.p2p.send if self.p2p else fallback.send_cost,
            bytes_per_value=self.bytes_per_value,
            blocking_p2p=self.blocking_p2p if self.p2p else fallback.blocking_p2p,
        )

    def check_spec(self, spec: ModelSpec, path: str = "profile") -> None:
        """The profile must be of this model: its modules are the spec's."""
        want = {e.name for e in spec.encoders} | {"llm"}
        if self.model != spec.name or set(self.modules) != want:
            raise ProfileError(
                f"{path}: profiled model {self.model!r} with modules {sorted(self.modules)}, "
                f"but the model given is {spec.name!r} with modules {sorted(want)}; "
                f"profile it with `entrain profile --model {spec.name}`"
            )

    def to_dict(self) -> dict:
        fits = lambda d: {m: {k: f.to_dict() for k, f in v.items()} for m, v in d.items()}  # noqa: E731
        return {
            "entrain_profile": FORMAT_VERSION,
            "model": self.model,
            "modules": fits(self.modules),
            "llm_projectors": fits(self.llm_projectors),
            "step": self.step,
            "hardware": {
                "flops": self.flops,
                "memory_bytes": self.memory_bytes,
                "devices": self.devices,
                "p2p": None if self.p2p is None else vars(self.p2p),
                "blocking_p2p": self.blocking_p2p,
                "bytes_per_value": self.bytes_per_value,
            },
            "host": self.host,
        }

    def save(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)


def _number(value, where: str, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ProfileError(f"{where}: expected a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ProfileError(f"{where}: must be {'positive' if positive else '>= 0'}, got {value}")
    return float(value)


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise ProfileError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def _fit(d, where: str) -> FitResult:
    d = _object(d, where)
    missing = [t for t in TERMS if t not in d]
    if missing:
        raise ProfileError(f"{where}: missing {', '.join(missing)}")
    return FitResult(
        coeffs=CostCoeffs(**{t: _number(d[t], f"{where}.{t}") for t in TERMS}),
        rel_rms=_number(d.get("rel_rms", 0.0), f"{where}.rel_rms"),
        max_rel=_number(d.get("max_rel", 0.0), f"{where}.max_rel"),
        runs=int(_number(d.get("runs", 0), f"{where}.runs")),
    )


def _fits(d, where: str) -> dict[str, dict[str, FitResult]]:
    out = {}
    for m, kinds in _object(d, where).items():
        kinds = _object(kinds, f"{where}.{m}")
        if "forward" not in kinds:
            raise ProfileError(f"{where}.{m}: missing forward")
        bad = set(kinds) - {"forward", "backward"}
        if bad:
            raise ProfileError(f"{where}.{m}: unknown key(s) {sorted(bad)}")
        out[m] = {k: _fit(v, f"{where}.{m}.{k}") for k, v in kinds.items()}
    return out


def load_profile(path: str | os.PathLike, spec: ModelSpec | None = None) -> Profile:
    """Read and check a profile (and, given `spec`, that it is of that model); every problem
    is a ProfileError naming the field."""
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: not a JSON profile ({e})") from None
    d = _object(d, path)
    if d.get("entrain_profile") != FORMAT_VERSION:
        raise ProfileError(
            f"{path}: not an entrain profile of format {FORMAT_VERSION} "
            f"(entrain_profile = {d.get('entrain_profile')!r}); make one with `entrain profile`"
        )
    if not isinstance(d.get("model"), str):
        raise ProfileError(f"{path}: model: expected the model's name")
    modules = _fits(d.get("modules"), f"{path}: modules")
    if "llm" not in modules:
        raise ProfileError(f"{path}: modules: missing llm")
    hw = _object(d.get("hardware"), f"{path}: hardware")
    p2p = hw.get("p2p")
    if p2p is not None:
        p2p = _object(p2p, f"{path}: hardware.p2p")
        p2p = P2PFit(
            latency=_number(p2p.get("latency"), f"{path}: hardware.p2p.latency"),
            bandwidth=_number(p2p.get("bandwidth"), f"{path}: hardware.p2p.bandwidth", True),
            send=_number(p2p.get("send", 0.0), f"{path}: hardware.p2p.send"),
            rel_rms=_number(p2p.get("rel_rms", 0.0), f"{path}: hardware.p2p.rel_rms"),
            runs=int(_number(p2p.get("runs", 0), f"{path}: hardware.p2p.runs")),
        )
    step = _object(d.get("step", {}), f"{path}: step")
    profile = Profile(
        model=d["model"],
        modules=modules,
        llm_projectors=_fits(d.get("llm_projectors", {}), f"{path}: llm_projectors"),
        step={m: _number(v, f"{path}: step.{m}") for m, v in step.items()},
        flops=_number(hw.get("flops"), f"{path}: hardware.flops", True),
        memory_bytes=_number(hw.get("memory_bytes"), f"{path}: hardware.memory_bytes", True),
        devices=int(_number(hw.get("devices", 1), f"{path}: hardware.devices", True)),
        p2p=p2p,
        blocking_p2p=bool(hw.get("blocking_p2p", True)),
        bytes_per_value=int(
            _number(hw.get("bytes_per_value", 4), f"{path}: hardware.bytes_per_value", True)
        ),
        host=_object(d.get("host", {}), f"{path}: host"),
    )
    if spec is not None:
        profile.check_spec(spec, path)
    return profile

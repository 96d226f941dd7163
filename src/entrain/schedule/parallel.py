"""The parallel plan: one value object for every degree of parallelism (torchtitan's
ParallelDims, extended with modality parallelism). The planner emits it; the simulator and
the runtime read it.

Layout of one data-parallel replica: each encoder on its own tensor-parallel group, then the
LLM as `llm_pp` pipeline stages of `llm_tp` GPUs each. Replicas are laid out one after the
other, so a replica's GPUs are contiguous ranks (and share a node when they fit in one).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from entrain.schedule.hierarchical import ORDERS


@dataclass(kw_only=True)
class ParallelPlan:
    """GPUs per module and the DP/PP/TP degrees of one static plan."""

    dp: int
    """Data-parallel replicas D."""
    llm_pp: int = 1
    """Pipeline stages of the LLM."""
    llm_tp: int = 1
    """Tensor-parallel GPUs per LLM stage."""
    encoder_tp: dict[str, int] = field(default_factory=dict)
    """Tensor-parallel degree of each encoder, by encoder name."""
    encoder_dp: dict[str, int] = field(default_factory=dict)
    """Copies of each encoder inside a replica (default 1): they split each encoder
    microbatch's units, so an encoder can get any number of GPUs, not only a TP degree."""
    microbatches: int = 1
    """Microbatches per replica per iteration M."""
    encoder_pool: int | None = None
    """How many replicas' encoders share one another's units (Entrain's pooling; None: all
    replicas). Like the lookahead, chosen by the planner."""
    encoder_lookahead: int | None = None
    """How many microbatches ahead of the LLM an encoder may encode a unit (Entrain's
    deferral depth; None: unlimited). A schedule knob, but one that sets activation memory
    and pipeline stalls, so the planner chooses it with the degrees."""
    encoder_order: str = "light-first"
    """How Entrain orders and packs each replica's microbatches (hierarchical.ORDERS:
    light-first, heavy-first, balanced, encoder-first, joint): which suits a plan depends
    on which module bounds its pipeline, so the planner chooses it by simulation too."""

    def __post_init__(self) -> None:
        if self.encoder_lookahead is not None and (
            not isinstance(self.encoder_lookahead, int)
            or isinstance(self.encoder_lookahead, bool)
            or self.encoder_lookahead < 0
        ):
            raise ValueError(
                f"plan.encoder_lookahead must be None or >= 0, got {self.encoder_lookahead!r}"
            )
        if self.encoder_pool is not None and (
            isinstance(self.encoder_pool, bool)
            or not isinstance(self.encoder_pool, int)
            or self.encoder_pool < 1
        ):
            raise ValueError(f"plan.encoder_pool must be None or >= 1, got {self.encoder_pool!r}")
        if self.encoder_order not in ORDERS:
            raise ValueError(
                f"plan.encoder_order must be one of {', '.join(ORDERS)}, got {self.encoder_order!r}"
            )
        for name in ("dp", "llm_pp", "llm_tp", "microbatches"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"plan.{name} must be an integer >= 1, got {v!r}")
        for table in ("encoder_tp", "encoder_dp"):
            for e, v in getattr(self, table).items():
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ValueError(f"plan.{table}[{e!r}] must be an integer >= 1, got {v!r}")
        stray = set(self.encoder_dp) - set(self.encoder_tp)
        if stray:
            raise ValueError(f"plan.encoder_dp names encoders without encoder_tp: {sorted(stray)}")

    def encoder_gpus(self, name: str) -> int:
        return self.encoder_tp[name] * self.encoder_dp.get(name, 1)

    @property
    def gpus_per_replica(self) -> int:
        return self.llm_pp * self.llm_tp + sum(self.encoder_gpus(e) for e in self.encoder_tp)

    @property
    def world_size(self) -> int:
        return self.dp * self.gpus_per_replica

    def check_modules(self, encoders: tuple[str, ...]) -> None:
        """Raise unless the plan places exactly these encoders."""
        if set(self.encoder_tp) != set(encoders):
            raise ValueError(
                f"plan places encoders {sorted(self.encoder_tp)} "
                f"but the model has {sorted(encoders)}"
            )

    def ranks(self, module: str, replica: int, stage: int = 0) -> list[int]:
        """Global ranks holding `module` (an encoder name or 'llm', with its pipeline stage)
        in `replica`."""
        base = replica * self.gpus_per_replica
        for e in self.encoder_tp:
            n = self.encoder_gpus(e)
            if e == module:
                return list(range(base, base + n))
            base += n
        if module != "llm" or not 0 <= stage < self.llm_pp:
            raise ValueError(f"no module {module!r} stage {stage} in this plan")
        start = base + stage * self.llm_tp
        return list(range(start, start + self.llm_tp))

    def describe(self) -> str:
        enc = " ".join(
            f"{e}:tp{tp}" + (f"x{self.encoder_dp[e]}" if self.encoder_dp.get(e, 1) > 1 else "")
            for e, tp in self.encoder_tp.items()
        )
        ahead = "" if self.encoder_lookahead is None else f" ahead={self.encoder_lookahead}"
        ahead += "" if self.encoder_pool is None else f" pool={self.encoder_pool}"
        ahead += "" if self.encoder_order == "light-first" else f" order={self.encoder_order}"
        return (
            f"dp{self.dp} x [{enc} llm:pp{self.llm_pp}xtp{self.llm_tp}] "
            f"M={self.microbatches}{ahead} ({self.world_size} GPUs)"
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> ParallelPlan:
        known = {
            "dp",
            "llm_pp",
            "llm_tp",
            "encoder_tp",
            "encoder_dp",
            "microbatches",
            "encoder_lookahead",
            "encoder_pool",
            "encoder_order",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"plan: unknown key(s) {unknown}; known: {sorted(known)}")
        for k in ("encoder_tp", "encoder_dp"):
            if k in data and not isinstance(data[k], dict):
                raise ValueError(f"plan.{k} must map encoder names to integers, got {data[k]!r}")
        try:
            return ParallelPlan(
                **{
                    k: (dict(v) if k in ("encoder_tp", "encoder_dp") else v)
                    for k, v in data.items()
                }
            )
        except TypeError as e:  # a required field is missing
            raise ValueError(f"plan: {e}") from None

"""`entrain profile`: time the real modules on this machine and fit the cost model.

Macro level: every timed run is a whole microbatch (a few samples drawn from the data, or
from a synthetic trace, with all their units), pushed through the same calls the runtime
makes (the tower on concatenated patches or stacked mel chunks; the LLM sample by sample,
with its loss), so the per-run overheads the runtime pays are in the timings. Forward and
backward are timed apart, then `cost/fit.py` fits a, b, c0 and a per-run constant for each.

Under torchrun every rank profiles at once (the machine is as busy as in training, and the
fit gets more runs), then ranks 0 and 1 time real sends between them for the link, and rank
0 writes the profile.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from entrain.cost.batch import CostedBatch, cost_batch
from entrain.cost.fit import fit_coeffs
from entrain.cost.flops import analytic_cost_model
from entrain.cost.profile import P2PFit, Profile
from entrain.cost.tokens import vision_grids
from entrain.data.sequence import IGNORE, Span
from entrain.models.spec import ModelSpec, VisionSpec
from entrain.runtime.device import Placement, name_of, place, sync
from entrain.runtime.modules import LLMStage
from entrain.runtime.optim import optimizer
from entrain.runtime.setup import SampleInputs
from entrain.runtime.source import PresetSource, model_source
from entrain.workload.columnar import Workload

P2P_BYTES = (4 * 256, 4 * 16_384, 4 * 131_072, 4 * 524_288, 4 * 1_048_576)


@dataclass(kw_only=True)
class ProfileConfig:
    """A profiling run."""

    model: str = "tiny"
    runs: int = 40
    """Timed microbatches per module on each process (after `warmup` untimed ones)."""
    warmup: int = 3
    max_samples: int = 8
    """A run takes 1..max_samples samples (varied counts and sizes make the fit well posed)."""
    seed: int = 0
    device: str = "auto"
    """Where to time the modules (runtime/device.py): profile where you will train."""


Run = tuple[np.ndarray, float]  # (unit sizes of the run, seconds)


def _timed(fn: Callable, *args) -> tuple[object, float]:
    sync()
    t0 = time.perf_counter()
    out = fn(*args)
    sync()  # on a GPU: the kernels' time, not their launch
    return out, time.perf_counter() - t0


def _each(module: nn.Module, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [module(x) for x in xs]


class _Inputs:
    """Synthetic tensors shaped like the runtime's inputs for the units of a costed batch:
    values do not change the time of dense math, shapes do."""

    def __init__(
        self,
        spec: ModelSpec,
        workload: Workload,
        batch: CostedBatch,
        seed: int,
        device: torch.device,
    ):
        self.spec, self.batch, self.device = spec, batch, device
        self.gen = torch.Generator().manual_seed(seed)
        self.grids: dict[str, np.ndarray] = {}
        for enc in spec.encoders:
            if isinstance(enc, VisionSpec):  # per item, as cost_batch numbers them
                grids = [
                    vision_grids(enc, m, workload.items[m].size)[:, 1:]
                    for m in enc.modalities
                    if len(workload.items[m])
                ]
                self.grids[enc.name] = np.concatenate(grids) if grids else np.zeros((0, 2), int)

    def encoder(self, enc, units: np.ndarray) -> tuple:
        """What `encode_units` hands the tower for these units."""
        u = self.batch.units[enc.name]
        if isinstance(enc, VisionSpec):
            grid = self.grids[enc.name][u.item[units]]
            width = enc.num_channels * enc.temporal_patch_size * enc.patch_size**2
            patches = torch.randn(int(grid.prod(1).sum()), width, generator=self.gen)
            thw = torch.tensor([[1, int(h), int(w)] for h, w in grid])
            return patches.to(self.device), thw.to(self.device)
        positions = int(round(enc.chunk_seconds * enc.frames_per_second))
        mels = torch.randn(len(units), enc.n_mels, 2 * positions, generator=self.gen)
        valid = [min(positions, int(x) * enc.downsample) for x in u.llm_tokens[units]]
        return mels.to(self.device), valid

    def llm_sample(self, s: int) -> tuple[torch.Tensor, SampleInputs]:
        """(modality embeddings, tokens) of sample s: its items' rows in front of its text."""
        text = int(self.batch.text_tokens[s])
        extra = int(self.batch.llm_tokens[s]) - text
        h = self.spec.llm.hidden_size
        emb = torch.randn(extra, h, generator=self.gen).to(self.device)
        ids = torch.randint(0, self.spec.llm.vocab_size, (extra + text,), generator=self.gen)
        labels = ids.clone()
        labels[:extra] = IGNORE
        inp = SampleInputs(
            ids.to(self.device),
            labels.to(self.device),
            torch.arange(extra + text, device=self.device)[None],
            (Span("image", 0, 0, extra),) if extra else (),
        )
        return emb.requires_grad_(bool(self.spec.encoders)), inp


def _units_of(u, draws: list[np.ndarray]):
    """The units of each drawn microbatch's samples (microbatches without any skipped)."""
    for samples in draws:
        units = np.flatnonzero(np.isin(u.sample, samples))
        if len(units):
            yield units


def _timed_backward(outs: list[torch.Tensor]) -> float:
    return _timed(torch.autograd.backward, outs, [torch.randn_like(o) for o in outs])[1]


def _time_encoder(
    tower: nn.Module, enc, inputs: _Inputs, trains: bool, draws: list[np.ndarray]
) -> tuple[list[Run], list[Run]]:
    u = inputs.batch.units[enc.name]
    fwd, bwd = [], []
    for units in _units_of(u, draws):
        args = inputs.encoder(enc, units)
        with torch.set_grad_enabled(trains):
            out, tf = _timed(tower if trains else tower.trunk, *args)
        fwd.append((u.tokens[units], tf))
        if trains:
            bwd.append((u.tokens[units], _timed_backward(out if isinstance(out, list) else [out])))
    return fwd, bwd


def _time_projector(
    proj: nn.Module, enc, inputs: _Inputs, draws: list[np.ndarray]
) -> tuple[list[Run], list[Run]]:
    """A frozen encoder's projector, which trains on the LLM side: per unit, on its states."""
    u = inputs.batch.units[enc.name]
    fwd, bwd = [], []
    for units in _units_of(u, draws):
        states = [
            torch.randn(int(x), enc.encoder.hidden_size).to(inputs.device) for x in u.tokens[units]
        ]
        outs, tf = _timed(_each, proj, states)
        fwd.append((u.tokens[units], tf))
        bwd.append((u.tokens[units], _timed_backward(outs)))
    return fwd, bwd


def _time_llm(
    stage: LLMStage, inputs: _Inputs, draws: list[np.ndarray]
) -> tuple[list[Run], list[Run]]:
    """The whole LLM as one stage, sample by sample as LLMWorker runs it."""

    def forward(data: list[tuple[torch.Tensor, SampleInputs]]) -> torch.Tensor:
        loss = None
        for emb, inp in data:
            h = stage.embed_sample(inp.ids, inp.spans, [[emb]] if inp.spans else [])
            h = stage(h, inp.positions)
            lo = stage.loss(h, inp.labels) / 1000.0
            loss = lo if loss is None else loss + lo
        return loss

    fwd, bwd = [], []
    for samples in draws:
        loss, tf = _timed(forward, [inputs.llm_sample(int(s)) for s in samples])
        _, tb = _timed(loss.backward)
        tokens = inputs.batch.llm_tokens[samples]
        fwd.append((tokens, tf))
        bwd.append((tokens, tb))
    return fwd, bwd


def _time_step(params: list[nn.Parameter], lr: float = 1e-3, repeats: int = 5) -> float:
    """Median seconds of one AdamW step over `params` (the optimizer the runtime uses)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return 0.0
    for p in params:
        p.grad = torch.randn_like(p)
    opt = optimizer(params, lr)
    opt.step()  # creates the state
    return statistics.median(_timed(opt.step)[1] for _ in range(repeats))


def measure(
    cfg: ProfileConfig,
    spec: ModelSpec,
    workload: Workload,
    rank: int = 0,
    on_run: Callable[[], None] | None = None,
) -> dict:
    """Every module's timed runs on this process: {"modules": {m: {"forward": runs, ...}},
    "llm_projectors": {...}, "step": {m: s}}."""
    torch.manual_seed(cfg.seed + 7919 * rank)
    device = place(cfg.device).device
    batch = cost_batch(workload, spec)
    inputs = _Inputs(spec, workload, batch, cfg.seed + 7919 * rank, device)
    rng = np.random.default_rng([cfg.seed, rank])
    n = batch.n_samples
    draws = [
        np.sort(
            rng.choice(n, size=int(rng.integers(1, min(cfg.max_samples, n) + 1)), replace=False)
        )
        for _ in range(cfg.warmup + cfg.runs)
    ]
    out: dict = {"modules": {}, "llm_projectors": {}, "step": {}}

    def timed(fn, *args):
        fn(*args[:-1], args[-1][: cfg.warmup])  # warm-up: first calls allocate and compile paths
        res = fn(*args[:-1], args[-1][cfg.warmup :])
        if on_run:
            on_run()
        return res

    # the run's real modules with random weights: values do not change the time of dense math
    if Path(cfg.model).is_dir():
        source = model_source(cfg.model, cfg.seed, init_from=None, frozen=_frozen(spec))
    else:
        source = PresetSource(spec, cfg.seed)
    for enc in spec.encoders:
        tower, named = source.encoder(enc.name, device)
        f, b = timed(_time_encoder, tower, enc, inputs, not enc.frozen, draws)
        out["modules"][enc.name] = {"forward": f, **({"backward": b} if b else {})}
        if enc.frozen:
            f, b = timed(_time_projector, tower.projector, enc, inputs, draws)
            out["llm_projectors"][enc.name] = {"forward": f, "backward": b}
            out["step"][enc.name] = 0.0
        else:
            out["step"][enc.name] = _time_step(list(named.values()))
    stage, named = source.llm_stage(0, 1, device)
    f, b = timed(_time_llm, stage, inputs, draws)
    out["modules"]["llm"] = {"forward": f, "backward": b}
    out["step"]["llm"] = _time_step(list(named.values()))
    out["flops"] = _achieved_flops(spec, out)
    return out


def _frozen(spec: ModelSpec) -> tuple[str, ...]:
    return tuple(e.name for e in spec.encoders if e.frozen) + (("llm",) if spec.llm_frozen else ())


def _achieved_flops(spec: ModelSpec, measured: dict) -> tuple[float, float]:
    """(FLOPs the analytic model counts for every timed run, their measured seconds)."""
    model = analytic_cost_model(spec)
    flops = secs = 0.0
    for m, kinds in measured["modules"].items():
        for kind, runs in kinds.items():
            coeffs = getattr(model[m], kind)
            for tokens, t in runs:
                flops += float(coeffs(tokens).sum())
                secs += t
    return flops, secs


def measure_p2p(peer: int, placement: Placement, repeats: int = 7) -> P2PFit | None:
    """Ranks 0 and 1 time Mailbox transfers of several sizes as the runtime makes them: the
    receive is posted ahead, the receiver takes the message once it was sent (it computed
    meanwhile), so its time is what taking a message costs it; the sender's time is what
    packing and posting one costs. Every rank gets the fit."""
    import datetime

    from entrain.runtime.comm import Mailbox, Transfer, capacity

    rank = dist.get_rank()
    device = placement.device
    mail = Mailbox(datetime.timedelta(seconds=60), device, wire=placement.wire)
    runs: list[Run] = []
    sends: list[float] = []
    for n_bytes in P2P_BYTES:
        x = torch.randn(n_bytes // 4 // 128, 128, device=device)
        size = capacity(1, [x.shape[0]], 128)
        for i in range(repeats + 1):
            key = ("p2p", n_bytes, i)
            mail.begin([Transfer(key, 0, peer, (i,), size, "a profile message")])
            if rank == peer:
                mail.expect(key)
            dist.barrier()
            if rank == 0:
                _, t = _timed(mail.send, key, [x])
                mail.flush()
                if i:
                    sends.append(t)
            elif rank == peer:
                time.sleep(0.01)
                _, t = _timed(mail.recv, key)
                if i:  # the first of each size is a warm-up
                    runs.append((np.array([float(x.numel() * 4)]), t))
                mail.flush()
        dist.barrier()
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, (runs, sends))
    runs, sends = got[peer][0], got[0][1]
    fit = fit_coeffs([r[0] for r in runs], [r[1] for r in runs], terms=("a", "call"))
    bandwidth = 1.0 / fit.coeffs.a if fit.coeffs.a > 0 else float("inf")
    return P2PFit(
        latency=fit.coeffs.call,
        bandwidth=bandwidth,
        send=statistics.median(sends),
        rel_rms=fit.rel_rms,
        runs=len(runs),
    )


def fit_profile(
    spec: ModelSpec,
    measured: list[dict],
    p2p: P2PFit | None,
    devices: int,
    placement: Placement,
) -> Profile:
    """Pool the runs of every process and fit each module's forward and backward."""

    def pooled(section: str) -> dict:
        out: dict = {}
        for m in measured[0][section]:
            out[m] = {}
            for kind in measured[0][section][m]:
                runs = [r for part in measured for r in part[section][m][kind]]
                if len(runs) < 4:
                    raise ValueError(
                        f"only {len(runs)} timed run(s) of {m} {kind}: the data has too few "
                        f"samples with {m} input; give more runs or other data"
                    )
                out[m][kind] = fit_coeffs([r[0] for r in runs], [r[1] for r in runs])
        return out

    flops = sum(p["flops"][0] for p in measured)
    secs = sum(p["flops"][1] for p in measured)
    step = {m: statistics.median(p["step"][m] for p in measured) for m in measured[0]["step"]}
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Profile(
        model=spec.name,
        modules=pooled("modules"),
        llm_projectors=pooled("llm_projectors"),
        step=step,
        flops=flops / secs if secs > 0 else 1.0,
        memory_bytes=ram / max(devices, 1),
        devices=devices,
        p2p=p2p,
        # gloo's receives run on the waiting core; NCCL's on a stream of their own
        blocking_p2p=placement.wire.type != "cuda",
        bytes_per_value=4,  # the runtime trains and sends fp32
        host={
            "device": name_of(placement),
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "threads_per_process": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    )


def run_profile(
    cfg: ProfileConfig,
    spec: ModelSpec,
    workload: Workload,
    on_run: Callable[[], None] | None = None,
) -> Profile | None:
    """Profile on this process, or on every process of the initialized group (rank 0 gets
    the profile, the others None)."""
    torch.set_num_threads(1)
    placement = place(cfg.device)
    if not dist.is_initialized():
        measured = [measure(cfg, spec, workload, 0, on_run)]
        return fit_profile(spec, measured, None, 1, placement)
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = measure(cfg, spec, workload, rank, on_run)
    dist.barrier()
    p2p = measure_p2p(1, placement)
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    if rank != 0:
        return None
    return fit_profile(spec, parts, p2p, world, placement)


def profile_main(
    cfg: ProfileConfig, spec: ModelSpec, workload: Workload, pin_cores: bool = False, console=None
) -> Profile | None:
    """`entrain profile` on this process (under torchrun: on every process, rank 0 returns
    the profile)."""
    import datetime

    from entrain.runtime.train import pin_to_core

    distributed = "RANK" in os.environ
    placement = place(cfg.device)
    if distributed and not dist.is_initialized():
        if placement.device.type == "cuda":
            torch.cuda.set_device(placement.device)
        dist.init_process_group(placement.backend, timeout=datetime.timedelta(seconds=600))
    rank = dist.get_rank() if distributed else 0
    if pin_cores:
        pin_to_core(rank)
    try:
        if rank != 0 or console is None:
            return run_profile(cfg, spec, workload)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        with Progress(
            TextColumn("[bold]profiling modules"),
            BarColumn(),
            MofNCompleteColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task("profile", total=len(spec.encoders) * 2 + 1)
            return run_profile(cfg, spec, workload, on_run=lambda: bar.advance(task))
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()

"""`entrain train`: the distributed training loop, one process per rank (torchrun).

Each rank holds one encoder or one LLM pipeline stage of one data-parallel replica. Every
step, every rank computes the same assignment from the same global batch, runs its action
list (runtime/engine.py), then gradients are summed across replicas of its module group and
AdamW steps. The loss is normalized by the target count of the whole global batch, so the
step's gradient does not depend on how samples were placed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from entrain.config import recompute_of
from entrain.cost.batch import CostedBatch, cost_batch
from entrain.program.order import Op, comm_ops, step_program
from entrain.program.transfers import edges, roles
from entrain.runlog import read_log
from entrain.runtime import checkpoint
from entrain.runtime.comm import Mailbox, p2p_channels
from entrain.runtime.device import Placement, place
from entrain.runtime.emulate import emulator_of
from entrain.runtime.engine import EncoderWorker, LLMWorker, StepStats
from entrain.runtime.grads import GradReducer
from entrain.runtime.inputs import load_records
from entrain.runtime.logbook import Logbook
from entrain.runtime.modules import enable_recompute
from entrain.runtime.optim import (
    clip_coefficient,
    compute_context,
    local_sq_norm,
    optimizer,
    peak_flops,
    resolve_precision,
    scale_grads,
    set_lr,
    state_bytes,
    wire_dtype,
)
from entrain.runtime.reference import loss_tokens
from entrain.runtime.rundir import (
    check_out,
    check_resume_order,
    check_shared,
    clear_run,
    order_of,
    record_json,
)
from entrain.runtime.setup import (
    Step,
    TrainConfig,
    encode_units,
    make_step,
    open_dataset,
    profile_of,
    resolve_lookahead,
    run_layout,
    source_of,
)
from entrain.runtime.stopping import StopRequest, signal_name
from entrain.schedule import replica_pool
from entrain.workload.manifest import read_manifest


@dataclass
class Prepared:
    step: Step
    program: list[Op]
    """This rank's list of the step program: its computes and communication, in order."""
    loss_tokens: int
    seconds: float
    """How long preparing it took."""
    flops: float = 0.0
    """Model FLOPs of the step (forward and backward of every module, analytic; recompute
    not counted, as MFU is defined)."""


RANK_NUMBERS = (
    "busy", "peak_deferred", "data_wait", "rss_mb", "state_bytes", "gpu_mb", "messages", "bytes",
    "started", "stop",
)  # fmt: skip
"""What each rank reports of a step, in the step's closing collective: rank 0 writes them to
metrics.jsonl, and every rank reads the stop column (whether any rank was asked to stop)."""


class PlanAhead:
    """Prepares step n + 1 in a background thread while step n trains, so the assignment
    (milliseconds of numpy per step, tens at large batches, on every rank) leaves the
    critical path: the thread computes while the main thread waits on messages or the GPU.
    Everything it computes is deterministic in the step number, so every rank still gets
    the same plan.

    The next step's preparation starts once this rank's first compute of the step is done
    (`start`), not when the step begins: at a step's start every rank is leaving the
    previous step's closing collective and issuing its first work, and a rank that left
    early and planned at once would take the CPU from the ranks still in that collective
    (with 32 ranks on 2 cores, spreading the next step's starts by 0.2-0.3 s)."""

    def __init__(self, prepare: Callable[[int], Prepared], steps: int):
        self.prepare, self.steps = prepare, steps
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="entrain-plan")
        self.pending: dict[int, Future] = {}

    def start(self, step: int) -> None:
        """Begin preparing `step` (once; nothing past the last step)."""
        if step < self.steps and step not in self.pending:
            self.pending[step] = self.pool.submit(self.prepare, step)

    def take(self, step: int) -> Prepared:
        """Step `step`'s preparation, waiting for it (or making it) if it is not done."""
        self.start(step)
        return self.pending.pop(step).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class Trainer:
    def __init__(
        self,
        cfg: TrainConfig,
        rank: int,
        world: int,
        placement: Placement,
        order: dict | None = None,
    ):
        self.cfg, self.rank, self.world = cfg, rank, world
        # what decides each step's samples (runtime/rundir.py); it hashes the manifest, so
        # once per run, not at every checkpoint
        self.order = order_of(cfg) if order is None else order
        self.placement, self.device = placement, placement.device
        self.source = source_of(cfg)
        self.spec = self.source.spec
        encoders = [e.name for e in self.spec.encoders]
        self.plan = run_layout(cfg, encoders, world)
        self.roles = roles(self.plan, encoders)
        self.role = self.roles[rank]
        self.trains = {e.name: not e.frozen for e in self.spec.encoders}
        self.emulated = emulator_of(cfg, self.spec, self.plan)  # --device emulate: no model
        if self.emulated is not None:  # sizes only: no files, tokenizer or validation
            self.skipped, self.data = [], self.emulated.data
        else:
            parsed = (load_records(cfg.data), read_manifest(cfg.data))  # once, for both uses
            self.data_codec = self.source.codec()
            self.skipped = self._check_samples(*parsed)
            workers = cfg.data_workers if self.role.module != "llm" else 0  # LLM ranks: none
            self.data = open_dataset(
                cfg, self.source, [b.index for b in self.skipped], parsed, workers=workers
            )
        profile = profile_of(cfg, self.spec)
        self.cost_model = profile.cost_model() if profile else None
        self.cfg = cfg = dataclasses.replace(
            cfg, lookahead=resolve_lookahead(cfg, self.data, profile, self.plan)
        )
        block = replica_pool(cfg.policy, cfg.dp, cfg.pool)
        groups = p2p_channels(edges(self.roles, self.trains, block), placement.wire)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.compute = compute_context(self.precision, self.device)
        self.mail = Mailbox(
            datetime.timedelta(seconds=cfg.timeout_s),
            self.device,
            groups,
            wire=placement.wire,
            dtype=wire_dtype(self.precision),
        )
        self.named: dict[str, torch.nn.Parameter] = {}
        self._build()
        self.groups = self._dp_groups()
        self.tied, self.tie_group = self._tie_group()
        shard = self.groups if cfg.shard_optimizer else None
        self.opt = optimizer(self.named, cfg.lr, cfg.weight_decay, self.device, shard)
        self.reducer = None
        self.last_end: float | None = None  # when this rank's previous step ended
        # every rank's name in metrics and traces ("vision.c1/r0"), by rank
        self.device_names = [r.device(self.plan.encoder_dp.get(r.module, 1)) for r in self.roles]
        if self.groups is not None:  # the tied embedding is summed in its own group
            params = [p for p in self.named.values() if p is not self.tied]
            self.reducer = GradReducer(params, self.groups, placement.wire)

    def _build(self) -> None:
        """This rank's modules, and only them (a model folder's other tensors are never
        read), on its device."""
        source, role, trains, device = self.source, self.role, self.trains, self.device
        if self.emulated is not None:  # computes sleep their simulated time (runtime/emulate.py)
            self.worker, self.named = self.emulated.worker(
                role, trains, lambda: self.current, source.tied_key
            )
            return
        recompute = recompute_of(self.cfg.recompute)
        if role.module != "llm":
            enc = next(e for e in self.spec.encoders if e.name == role.module)
            tower, self.named = source.encoder(enc.name, device)
            if trains[enc.name] and recompute.get(enc.name, recompute["*"]) == "full":
                enable_recompute(tower)
            self.worker = EncoderWorker(
                role,
                trains[enc.name],
                lambda units: encode_units(
                    tower, enc, self.data, self.current, units, trains[enc.name], device
                ),
            )
            return
        stage, self.named = source.llm_stage(role.stage, self.plan.llm_pp, device)
        if recompute.get("llm", recompute["*"]) == "full":
            enable_recompute(stage)
        projectors = {}
        if role.stage == 0:  # frozen encoders' projectors train on the LLM side
            for e in self.spec.encoders:
                if e.frozen:
                    projectors[e.name], part = source.llm_projector(e.name, device)
                    self.named.update(part)
        self.worker = LLMWorker(
            role,
            stage,
            lambda i: self.data.inputs(int(self.current.indices[i]), device),
            projectors,
            trains,
        )

    def _dp_groups(self):
        """A process group per module group (the same module across replicas and copies)
        that has more than one rank; every rank creates every group, in the same order, as
        torch.distributed requires."""
        mine = None
        for module in [e.name for e in self.spec.encoders] + [
            f"llm.s{s}" for s in range(self.plan.llm_pp)
        ]:
            ranks = [i for i, r in enumerate(self.roles) if r.name == module]
            if len(ranks) == 1:
                continue
            g = dist.new_group(ranks)
            if self.role.name == module:
                mine = g
        return mine

    def _tie_group(self) -> tuple[nn.Parameter | None, dist.ProcessGroup | None]:
        """When the LM head shares the token embedding and they sit on different stages, the
        first and last stages of every replica each hold a copy: their gradients are summed
        in one group (Megatron's embedding group), so both copies take the same step. Every
        rank creates the group, as torch.distributed requires."""
        key, P = self.source.tied_key, self.plan.llm_pp
        if key is None or P == 1:
            return None, None
        ranks = [i for i, r in enumerate(self.roles) if r.module == "llm" and r.stage in (0, P - 1)]
        group = dist.new_group(ranks)
        if self.rank not in ranks:
            return None, None
        return self.named[key], group

    def prepare(self, step: int) -> Prepared:
        """What a step computes without communicating: its batch, assignment, plan and this
        rank's transfers. PlanAhead runs it a step ahead, in a thread."""
        t0 = time.perf_counter()
        st = make_step(
            self.data,
            self.cfg,
            step,
            self.plan.llm_pp,
            self.cost_model,
            wire_dtype(self.precision).itemsize,
            self.plan.encoder_dp,
        )
        if self.emulated is not None:  # one value a row on the wire; each compute's seconds
            st = self.emulated.step(st)
        if self.role.module != "llm":  # start decoding the inputs this rank will encode
            e, r, c = self.role.module, self.role.replica, self.role.copy
            self.data.loader.want(
                self.data.key(int(st.indices[ref.sample]), ref)
                for k in range(self.cfg.microbatches)
                for u in st.plan.copy_units(e, r, k, c)
                for ref in (st.plan.units[e][u],)
            )
        flops_batch = (
            st.batch
            if self.cost_model is None
            else cost_batch(self.data.workload.take(st.indices), self.spec)
        )
        return Prepared(
            st,
            step_program(st.plan, self.roles, self.trains)[self.rank],
            loss_tokens(self.data, st.indices),
            time.perf_counter() - t0,
            model_flops(flops_batch),
        )

    def step(
        self, step: int, ahead: PlanAhead | None = None, stop: StopRequest | None = None
    ) -> dict:
        """Train step `step`. `stop`: this rank's stop flag, as it stands when the rank
        reaches the step's closing collective, is agreed there with every rank's (the dict's
        `_stop`: the same on all ranks, 0 when none was asked to stop)."""
        t_start = time.perf_counter()
        prepared = ahead.take(step) if ahead else self.prepare(step)
        plan_wait = time.perf_counter() - t_start  # what the plan cost the critical path
        self.current = st = prepared.step
        norm = prepared.loss_tokens
        stats = StepStats(first_done=(lambda: ahead.start(step + 1)) if ahead else None)
        self.mail.begin(comm_ops(prepared.program))
        # No barrier: the previous step's closing collective is the boundary. Every rank had
        # received all of that step's messages before it, so what arrives now is this
        # step's; a rank that starts early waits on its first message as it would on a
        # barrier, and one collective of every rank a step is fewer (at 32 ranks on gloo a
        # barrier cost up to a quarter of a second).
        _inject_fault(step, self.rank)
        t0 = time.perf_counter()
        loss = 0.0
        arm = self.reducer.arm if self.reducer else None
        # one autocast region for the whole step: its cache casts each weight to bf16 once,
        # not once per microbatch in flight (every cast would live until that backward)
        with self.compute():
            if isinstance(self.worker, EncoderWorker):
                self.worker.step(st.plan, prepared.program, self.mail, stats, arm)
            else:
                loss = self.worker.step(st.plan, prepared.program, self.mail, stats, norm, arm)
        self.mail.flush()
        data_wait = self.data.loader.take_wait()
        self._all_reduce_grads()
        started = time.time() - (time.perf_counter() - t_start)  # by the wall clock ranks share
        mine = self._rank_numbers(stats, data_wait, started, stop.signum if stop else 0)
        grad_norm, total, table = self._close(loss, mine)
        lr = self.cfg.lr_at(step)
        if self.cfg.save_params:  # the step's gradients, for the equivalence tests
            self.last_grads = {
                n: p.grad.detach().clone() for n, p in self.named.items() if p.grad is not None
            }
        if self.opt is not None:
            set_lr(self.opt, lr)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        # no closing barrier: the closing collective already waited for every rank's last
        # backward
        t_end = time.perf_counter()
        wall = t_end - t_start
        # what the loop did on this rank since the previous step ended: the metrics,
        # logging, checkpoints (not in iter_time, which is the step itself)
        between = t_start - self.last_end if self.last_end is not None else None
        self.last_end = t_end
        traced = self._trace(stats, t0) if self.cfg.trace and step == self.cfg.steps - 1 else None
        col = dict(zip(RANK_NUMBERS, table.T.tolist()))
        agreed = int(max(col["stop"]))
        if self.rank != 0:
            return {"step": step, "loss": float(total) / norm, "iter_time": wall, "_stop": agreed}
        names = self.device_names
        # the step ran from when its first rank began it (ranks start when each is ready,
        # rank 0 after writing the last step's metrics) to the closing collective, which
        # every rank's last backward came before
        wall = max(wall, started + wall - min(col["started"]))
        tokens = int(st.batch.llm_tokens.sum())
        peak = peak_flops(self.device, self.precision)
        gpu = self.device.type == "cuda"
        return {
            "step": step,
            "loss": float(total) / norm,
            "iter_time": wall,
            "plan_time": prepared.seconds,
            "plan_wait": plan_wait,
            "between_steps": between,
            "samples_per_s": len(st.indices) / wall,
            "tokens_per_s": tokens / wall,
            "grad_norm": grad_norm,
            "lr": lr,
            "model_tflops": prepared.flops / wall / 1e12,
            "mfu": prepared.flops / wall / (peak * self.world) if peak else None,
            # AdamW makes its state in its first step, after the closing collective: known
            # from a launch's second step on (`between` is None on its first), or from a
            # resumed checkpoint's
            "optimizer_state_mb": dict(zip(names, (b / 2**20 for b in col["state_bytes"])))
            if between is not None or any(col["state_bytes"])
            else None,
            "peak_gpu_mb": dict(zip(names, col["gpu_mb"])) if gpu else None,
            "data_wait": max(col["data_wait"]),
            "busy": dict(zip(names, col["busy"])),
            "idle": {n: wall - plan_wait - b for n, b in zip(names, col["busy"])},
            "peak_deferred_tokens": int(max(col["peak_deferred"])),
            "peak_rss_mb": {n: round(m, 1) for n, m in zip(names, col["rss_mb"])},
            "precision": self.precision,
            "p2p_messages": int(sum(col["messages"])),
            "p2p_mb": sum(col["bytes"]) / 2**20,
            "_events": traced[0] if traced else None,
            "_messages": traced[1] if traced else None,
            "_samples": [self.data.records[int(i)].id for i in st.indices],
            "_stop": agreed,
        }

    def _rank_numbers(
        self, stats: StepStats, data_wait: float, started: float, stop: int
    ) -> list[float]:
        """This rank's numbers of the step (RANK_NUMBERS), for its row of the closing
        collective's table. Peaks and the optimizer's state are as of that collective, before
        the step's optimizer step (which the next step's numbers include)."""
        mine = {
            "busy": stats.busy,
            "peak_deferred": stats.peak_deferred,
            "data_wait": data_wait,
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB -> MiB
            "state_bytes": state_bytes(self.opt),
            "gpu_mb": torch.cuda.max_memory_allocated(self.device) / 2**20
            if self.device.type == "cuda"
            else 0.0,
            "messages": len(self.mail.sent),
            "bytes": sum(n for _, _, n in self.mail.sent),
            "started": started,
            "stop": stop,
        }
        return [float(mine[k]) for k in RANK_NUMBERS]

    def _trace(self, stats: StepStats, t0: float) -> tuple[list, list] | None:
        """The step's events of every rank, on one clock (each rank's start by the wall
        clock: ranks no longer leave a barrier together), and every message each rank sent,
        in its order, gathered on rank 0 (None elsewhere): what --trace writes."""
        start = time.time() - (time.perf_counter() - t0)  # this rank's t0, by the wall clock
        mine = (start, [(lab, a - t0, b - t0) for lab, a, b in stats.events], self.mail.sent)
        got = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, got, dst=0)
        if got is None:
            return None
        first = min(g[0] for g in got)
        events = [
            (name, lab, a + start - first, b + start - first)
            for name, (start, evs, _) in zip(self.device_names, got)
            for lab, a, b in evs
        ]
        messages = [
            {"src": rank, "dst": dst, "key": list(key), "bytes": n}
            for rank, (_, _, sent) in enumerate(got)
            for key, dst, n in sent
        ]
        return events, messages

    def _all_reduce_grads(self) -> None:
        """Sum gradients over the replicas of this rank's module (buckets started during the
        last backward: runtime/grads.py), and a tied embedding's over its group (which holds
        every replica's copies: it is not summed twice)."""
        if self.reducer is not None:
            self.reducer.finish()
        p = self.tied
        if p is not None and p.requires_grad:
            if p.grad is None:  # every member takes part in the sum
                p.grad = torch.zeros_like(p)
            self._all_reduce(p.grad, self.tie_group)

    def tensor_bytes(self) -> int:
        """Bytes of this rank's parameters (each once), gradients and optimizer state."""
        params = {id(p): p for p in self.named.values()}.values()
        total = sum(p.numel() * p.element_size() for p in params)
        total += sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        return total + state_bytes(self.opt)

    def _close(self, loss: float, mine: list[float]) -> tuple[float, float, np.ndarray]:
        """The step's one collective of every rank: each rank's row (its share of the
        squared gradient norm, its summed loss (last stages) and its RANK_NUMBERS) goes to
        every rank, which sums the norm and the loss in rank order (the same floats on every
        rank); then every gradient is scaled to `--clip-grad` when the norm is larger. One
        collective, not one each for the norm, the loss, the metrics and the stop check:
        ranks leave a collective at different times and start the next step that far apart.
        Each parameter counts once in the norm: replicas hold the same summed gradient
        (replica 0 counts it), a tied embedding's second copy (on the last stage) is left
        out. Returns (norm, summed loss, the world x RANK_NUMBERS table)."""
        counted = []
        if self.role.replica == 0 and self.role.copy == 0:
            counted = [
                p for p in self.named.values()
                if p.requires_grad and not (p is self.tied and self.role.stage != 0)
            ]  # fmt: skip
        row = torch.tensor([float(local_sq_norm(counted)), loss, *mine], dtype=torch.float64)
        table = exchange_rows(row, self.placement.wire, self.rank, self.world)
        norm = float(table[:, 0].sum()) ** 0.5
        scale_grads(self.named.values(), clip_coefficient(norm, self.cfg.clip_grad))
        return norm, float(table[:, 1].sum()), table[:, 2:]

    def _all_reduce(self, grad: torch.Tensor, group) -> None:
        wire = self.placement.wire
        if grad.device == wire:
            dist.all_reduce(grad, group=group)
        else:  # ranks share a GPU: through host memory over gloo
            g = grad.to(wire)
            dist.all_reduce(g, group=group)
            grad.copy_(g)

    def _check_samples(self, records: list, workload) -> list:
        """Rank 0 checks every sample against its files (all decoded once); every rank gets
        the verdict, so all leave out the same samples or all stop with the same message.

        The check lasts as long as reading the data set's files does (hours for millions of
        files on a network disk), while every collective is bounded by --timeout. So rank 0
        checks in a thread and meanwhile broadcasts "not yet" every `poll` seconds: the
        other ranks wait for the verdict as long as rank 0 is checking, each broadcast
        within the timeout, and still fail at once if rank 0 dies (the connection closes).
        One check on rank 0 rather than shares on every rank: shares would decode on every
        rank at once (each with its own file threads) and still meet at a collective after
        the slowest share."""
        from concurrent.futures import wait

        from entrain.runtime.inputs import SampleError
        from entrain.runtime.validate import summary, validate_samples

        cfg = self.cfg
        if cfg.validate == "off":
            return []
        poll = min(1.0, cfg.timeout_s / 4)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="entrain-validate") as pool:
            checking = None
            if self.rank == 0:
                checking = pool.submit(
                    validate_samples,
                    records,
                    workload,
                    self.spec,
                    cfg.max_sample_tokens,
                    workers=min(8, os.cpu_count() or 1),
                    decode=cfg.validate == "full",
                    codec=self.data_codec,
                )
            done = torch.zeros(1, dtype=torch.int64)  # CPU: gloo carries it
            while not done.item():
                if checking is not None:
                    wait([checking], timeout=poll)
                    done.fill_(int(checking.done()))
                dist.broadcast(done, src=0)
            verdict: list = [checking.result() if checking is not None else None]
        dist.broadcast_object_list(verdict, src=0)
        bad = verdict[0]
        if bad and not cfg.skip_bad:
            raise SampleError(
                summary(bad, cfg.data) + "\n(fix them, or pass --skip-bad to train without them)"
            )
        if bad and self.rank == 0:
            print(f"entrain: skipping {summary(bad, cfg.data)}", flush=True)
            if cfg.out:
                Path(cfg.out).mkdir(parents=True, exist_ok=True)
                with open(Path(cfg.out) / "skipped.jsonl", "w", encoding="utf-8") as f:
                    for b in bad:
                        f.write(json.dumps({"id": b.id, "line": b.line, "reason": b.reason}))
                        f.write("\n")
        return bad

    @property
    def checkpoint_root(self) -> Path | None:
        """Where this run checkpoints (None: it does not)."""
        cfg = self.cfg
        if not (cfg.checkpoint_every or cfg.checkpoint_on_stop):
            return None
        root = (
            cfg.checkpoint_dir or cfg.resume or (Path(cfg.out) / "checkpoints" if cfg.out else None)
        )
        if root is None:
            raise ValueError(
                "--checkpoint-every and --checkpoint-on-stop need --checkpoint-dir, --resume "
                "or --out"
            )
        return Path(root)

    def _layout(self) -> dict:
        """What a checkpoint must match to be resumed here."""
        order = {k: v for k, v in self.order.items() if k != "data"}  # by content
        return {
            "model": self.spec.name,
            "world": self.world,
            "plan": self.plan.to_dict(),
            "order": order,
        }

    def save_checkpoint(self, steps_done: int) -> None:
        checkpoint.save(
            self.checkpoint_root,
            steps_done,
            self.named,
            self.opt,
            self._layout(),
            self.cfg.keep_checkpoints,
        )

    def resume(self) -> int:
        """Restore the newest intact checkpoint of --resume; the first step to run. Every
        rank gets the same checkpoint, or the same error (runtime/checkpoint.py)."""
        if self.checkpoint_root is not None:  # a file: refused now, not at the first save
            checkpoint.check_folder(self.checkpoint_root)
        if not self.cfg.resume:
            return 0
        found = checkpoint.restore(self.cfg.resume, self.named, self.opt, self._layout())
        if self.rank == 0:
            if found.path is None:
                print(f"entrain: no checkpoint in {self.cfg.resume} yet; starting at step 0")
            else:
                for line in found.notes():
                    print(f"entrain: {line}", flush=True)
                print(f"entrain: resumed from {found.path} ({found.steps} steps done)")
        return found.steps

    def save_params(self, out: Path) -> None:
        """This rank's parameters after the last step, and that step's (clipped) gradients."""
        if self.role.replica == 0 and self.role.copy == 0:
            torch.save(
                {n: p.detach().cpu().clone() for n, p in self.named.items()},
                out / f"params-{self.role.name}.pt",
            )
            grads = getattr(self, "last_grads", {})
            torch.save({n: g.cpu() for n, g in grads.items()}, out / f"grads-{self.role.name}.pt")


def exchange_rows(row: torch.Tensor, wire: torch.device, rank: int, world: int) -> np.ndarray:
    """Every rank's `row` (float64, the same length on all), as a world x len table on every
    rank. On GPUs, an all-reduce of the table with this rank's row filled in (NCCL's
    small-message algorithms are a few hops deep). On gloo, an all-to-all (each rank sends
    its row to every other, all at once): gloo's all-reduce is a ring, 2 x (world - 1)
    hops one after another, each waiting for a process to be scheduled, which with 32
    ranks on 2 cores held the last rank to arrive for a tenth of a second."""
    n = row.numel()
    if wire.type == "cpu":
        out = torch.empty(world * n, dtype=torch.float64)
        dist.all_to_all_single(out, row.repeat(world))
        return out.view(world, n).numpy()
    table = torch.zeros(world, n, dtype=torch.float64, device=wire)
    table[rank] = row.to(wire)
    dist.all_reduce(table)
    return table.cpu().numpy()


def _init_process_group(timeout: datetime.timedelta, placement: Placement) -> None:
    """gloo on CPU; NCCL for CUDA tensors with gloo beside it (runtime/device.py). Under
    torchrun the store keys get the restart count as a prefix: after a restart, ranks
    otherwise found the previous attempt's peer addresses in the store and failed to connect
    (seen with torch 2.13)."""
    env = os.environ
    if placement.device.type == "cuda":  # before NCCL: its communicators bind the current GPU
        torch.cuda.set_device(placement.device)
    if "TORCHELASTIC_RESTART_COUNT" not in env:
        dist.init_process_group(placement.backend, timeout=timeout)
        return
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    agent = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # the agent hosts the store
    store = dist.TCPStore(
        env["MASTER_ADDR"],
        int(env["MASTER_PORT"]),
        world,
        is_master=not agent and rank == 0,
        timeout=timeout,
    )
    store = dist.PrefixStore(f"entrain/attempt{env['TORCHELASTIC_RESTART_COUNT']}", store)
    dist.init_process_group(
        placement.backend, store=store, rank=rank, world_size=world, timeout=timeout
    )


class MemoryPeak:
    """The peak bytes of live tensors during a step: what was live when it started (this
    rank's parameters and optimizer state, `baseline`) plus the highest running sum of the
    allocations and frees torch's profiler records in it (the CPU allocator's, or the GPU's).
    What the planner's memory model is held to (tests/test_memory.py). Categories by torch's
    memory profiler are added when its analysis of the step succeeds (it is best effort)."""

    def __init__(self, baseline: int = 0):
        self.baseline = baseline

    def __enter__(self) -> MemoryPeak:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
        )
        self.prof = profile(
            activities=acts, profile_memory=True, record_shapes=True, with_stack=True
        )
        self.prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.prof.__exit__(*exc)

    def peak(self, device: str) -> int:
        from torch._C._profiler import _EventType

        events = []
        stack = list(self.prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            e = stack.pop()
            if e.tag == _EventType.Allocation and str(e.extra_fields.device).startswith(device):
                events.append((e.start_time_ns, e.extra_fields.alloc_size))
            stack.extend(e.children)
        live = top = 0
        for _, size in sorted(events):
            live += size
            top = max(top, live)
        return self.baseline + top

    def categories(self, device: str) -> dict[str, int]:
        """Bytes by category at the peak, by torch's memory profiler (empty when its
        analysis fails, as it does on some steps)."""
        try:
            from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX, MemoryProfileTimeline

            timeline = MemoryProfileTimeline(self.prof._memory_profile())
            _, sizes = timeline._coalesce_timeline(device)
        except (AssertionError, RuntimeError, KeyError, ValueError):
            return {}
        row = max(sizes, key=sum) if sizes else []
        names = {i + 1: (c.name.lower() if c else "unknown") for c, i in _CATEGORY_TO_INDEX.items()}
        return {names.get(i, str(i)): int(v) for i, v in enumerate(row) if v}

    def save(self, path: Path, **about) -> None:
        device = "cuda" if torch.cuda.is_available() and torch.cuda.is_initialized() else "cpu"
        about["peak_bytes"] = self.peak(device)
        about["at_peak"] = self.categories("cuda:0" if device == "cuda" else "cpu")
        about["device"] = device
        path.write_text(json.dumps(about) + "\n", encoding="utf-8")


def model_flops(batch: CostedBatch) -> float:
    """Forward and backward FLOPs of every module on a batch costed in FLOPs."""
    units = sum(float(u.fwd.sum() + u.bwd.sum()) for u in batch.units.values())
    return float(batch.llm_fwd.sum() + batch.llm_bwd.sum()) + units


def _inject_fault(step: int, rank: int) -> None:
    """A test hook: ENTRAIN_FAULT_INJECT="STEP:RANK:MARKER" SIGKILLs rank RANK a few
    milliseconds into step STEP, once (the marker file remembers, so a restarted run
    passes). How the fault tests kill a rank mid-step without touching the engine."""
    spec = os.environ.get("ENTRAIN_FAULT_INJECT")
    if not spec:
        return
    at, who, marker = spec.split(":", 2)
    if int(at) == step and int(who) == rank and not os.path.exists(marker):
        Path(marker).write_text(f"killed rank {rank} in step {step}\n")
        threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGKILL)).start()


def _keep_steps_before(path: Path, step: int) -> None:
    """Drop the lines of a per-step JSONL log from `step` on: a resumed run redoes them
    (their effect on the weights was not checkpointed). A last line cut short by a stop
    mid-write goes too, with a note."""
    if path.exists():
        notes: list[str] = []
        kept = [row for row in read_log(path, notes, need=("step",)) if row["step"] < step]
        for note in notes:
            print(f"entrain: {note}", flush=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")


def pin_to_core(rank: int) -> None:
    """Run this process on one core of its own (by local rank): timings on a small shared
    machine stop depending on where the scheduler puts each rank."""
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(os.environ.get("LOCAL_RANK", rank)) % len(cores)]})


TraceWriter = Callable[[list, Path, str], None]
"""Writes a step's events (rank, label, start, end) to a file: the report layer's business,
handed in by the caller (the runtime does not import report/)."""


def run(cfg: TrainConfig, progress: bool = True, on_trace: TraceWriter | None = None) -> list[dict]:
    """Train under an initialized process group (or initialize it from torchrun's env)."""
    stop = StopRequest()
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread
        stop.install(watch="TORCHELASTIC_RESTART_COUNT" in os.environ)
    try:
        return _run(cfg, stop, progress, on_trace)
    finally:
        stop.restore()


def _run(
    cfg: TrainConfig, stop: StopRequest, progress: bool, on_trace: TraceWriter | None
) -> list[dict]:
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    check_out(cfg, restarted)  # every rank: the same answer, before anything is written
    placement = place(cfg.device)
    if not dist.is_initialized():
        _init_process_group(datetime.timedelta(seconds=cfg.timeout_s), placement)
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    # before any rank writes: every node sees the run's folders (runtime/rundir.py); the
    # processes of one torchrun agent share its file system, so one node skips it
    if os.environ.get("GROUP_WORLD_SIZE") != "1":
        check_shared(cfg, rank, world, dist.all_gather_object)
    if cfg.pin_cores:
        pin_to_core(rank)
    order = order_of(cfg)
    if rank == 0:
        if cfg.overwrite and not restarted:
            clear_run(cfg)
        check_resume_order(cfg, order)
    trainer = Trainer(cfg, rank, world, placement, order)
    out = Path(cfg.out) if cfg.out else None
    start = trainer.resume()
    if out and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        # what replay (`entrain runs --simulate`), report and export read back, typed; written
        # once the checkpoint is accepted, with this launch as the run's newest segment
        record = record_json(trainer.cfg, trainer.plan.to_dict(), world, start, out, trainer.order)
        (out / "config.json").write_text(record, encoding="utf-8")
        for log in ("metrics.jsonl", "samples.jsonl"):  # steps past the checkpoint are redone
            _keep_steps_before(out / log, start)
        if cfg.empty_microbatches:
            print(
                f"entrain: {cfg.empty_microbatches} of {cfg.microbatches} microbatches per "
                "replica are empty every step (--allow-empty-microbatches)",
                flush=True,
            )
    dist.barrier()
    history = []
    bar = _progress(cfg.steps, start) if (progress and rank == 0) else None
    logs = Logbook(out, start, cfg.tensorboard) if out and rank == 0 else None
    ahead = PlanAhead(trainer.prepare, cfg.steps)
    try:
        for step in range(start, cfg.steps):
            if cfg.profile_memory and out and step == cfg.steps - 1:
                with MemoryPeak(trainer.tensor_bytes()) as peak:
                    m = trainer.step(step, ahead, stop)
                peak.save(out / f"memory-{rank}.json", rank=rank, role=trainer.role.name,
                          replica=trainer.role.replica, copy=trainer.role.copy)  # fmt: skip
            else:
                m = trainer.step(step, ahead, stop)
            events = m.pop("_events", None)
            messages = m.pop("_messages", None)
            consumed = m.pop("_samples", None)
            signum = m.pop("_stop")
            history.append(m)
            if logs:
                logs.write(step, m, consumed)
            saved = (
                trainer.checkpoint_root is not None
                and cfg.checkpoint_every > 0
                and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps)
            )
            if saved:
                trainer.save_checkpoint(step + 1)
            if bar:
                bar[0].update(
                    bar[1], advance=1, description=f"step {step + 1} loss {m['loss']:.4f}"
                )
            if out and rank == 0 and cfg.trace and on_trace and step == cfg.steps - 1:
                on_trace(events, out / "trace.json", f"entrain train ({cfg.policy})")
                # the step's messages, each sender's in its order: what the simulator times
                (out / "messages.json").write_text(json.dumps(messages), encoding="utf-8")
            if step + 1 < cfg.steps and signum:
                if bar:
                    bar[0].stop()
                    bar = None
                if cfg.checkpoint_on_stop and not saved:
                    trainer.save_checkpoint(step + 1)
                    saved = True
                if rank == 0:
                    _say_stopped(signum, step + 1, cfg.steps, trainer.checkpoint_root)
                break
        else:
            if out and cfg.save_params:
                trainer.save_params(out)
        dist.barrier()
        if rank == 0 and trainer.skipped:
            where = f" (listed in {out / 'skipped.jsonl'})" if out else ""
            print(f"entrain: trained without {len(trainer.skipped)} bad sample(s){where}")
    finally:
        ahead.close()
        trainer.data.loader.close()
        if logs:
            logs.close()
        if bar:
            bar[0].stop()
    return history


def _say_stopped(signum: int, done: int, steps: int, root: Path | None) -> None:
    """The one line a stopped run leaves: why, after which step, where to continue from
    (stderr: the launcher reads it there and then says nothing more). Best effort: when the
    launcher is gone, so is the pipe."""
    last = checkpoint.latest(root) if root is not None else None
    where = (
        f"last checkpoint {last} (continue with --resume {root})"
        if last is not None
        else "no checkpoint (use --checkpoint-every N or --checkpoint-on-stop to keep progress)"
    )
    try:
        print(
            f"entrain: stopped by {signal_name(signum)} after step {done} of {steps}; {where}",
            file=sys.stderr,
            flush=True,
        )
    except OSError:
        pass


def _progress(total: int, done: int = 0):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    p = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=True,
    )
    p.start()
    return p, p.add_task("training", total=total, completed=done)


def main_from_env(cfg: TrainConfig, on_trace: TraceWriter | None = None) -> int:
    """Entry under torchrun: RANK, WORLD_SIZE, MASTER_ADDR/PORT come from the environment.
    The caller leaves the process group (cli.py does, after printing any error)."""
    if "RANK" not in os.environ:
        raise ValueError("entrain train runs under torchrun; without it, pass --nproc P")
    run(cfg, on_trace=on_trace)  # the CLI leaves the process group after any error is out
    return 0

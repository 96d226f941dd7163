"""The commands that run the model: `entrain train` (launching torchrun when asked) and
`entrain profile`."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

from rich.console import Console
from rich.table import Table

from entrain.cli_common import UserError, device_flag, stdout_console
from entrain.workload.traces import GENERATORS


def add_train_parser(sub) -> argparse.ArgumentParser:
    """`entrain train [RECIPE] [section.key=value ...] [flags]`: flags, help and defaults come
    from the config's components (entrain/config.py)."""
    from entrain.config import add_flags

    tr = sub.add_parser(
        "train",
        help="train for real with torchrun (CPU with gloo, GPUs with NCCL)",
        description="Train a model on a training manifest with real Hugging Face modules: each "
        "encoder on its own ranks, the LLM as pipeline stages, times data-parallel replicas. "
        "Settings come from a recipe (YAML, one mapping per section), then section.key=value "
        "overrides, then flags. Run it under torchrun, or pass --nproc P to launch torchrun "
        "on this machine.",
    )
    tr.add_argument(
        "recipe",
        nargs="*",
        metavar="RECIPE.yaml | section.key=value",
        help="a recipe file (examples/recipes/), and overrides of its keys",
    )
    add_flags(tr)
    launch = tr.add_argument_group("launching")
    launch.add_argument(
        "--nproc", type=int, default=None, help="launch torchrun with this many processes"
    )
    launch.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="with --nproc: torchrun restarts the ranks this many times after a failure "
        "(use with --resume to continue from the last checkpoint)",
    )
    tr.set_defaults(func=cmd_train, argv=None)
    return tr


def train_config(args: argparse.Namespace):
    """The run's TrainConfig from a parsed `entrain train` command line."""
    from entrain.config import SECTIONS, config_from

    fields = {f for cls in SECTIONS.values() for f in cls.__dataclass_fields__}
    flags = {k: v for k, v in vars(args).items() if k in fields}
    positional = list(args.recipe or [])
    recipe = None
    if positional and "=" not in positional[0]:
        recipe = positional.pop(0)
    stray = [p for p in positional if "=" not in p]
    if stray:
        raise UserError(
            f"{stray[0]!r}: expected a recipe file first, then section.key=value overrides"
        )
    return config_from(flags, recipe, positional)


def cmd_train(args: argparse.Namespace, err: Console) -> int:
    cfg = train_config(args)
    if "RANK" in os.environ:
        from entrain.report.trace import write_chrome_trace
        from entrain.runtime.train import main_from_env

        return main_from_env(cfg, lambda ev, path, name: write_chrome_trace(ev, path, name=name))
    if not args.nproc:
        raise UserError(
            "run `entrain train` under torchrun, or pass --nproc P to have it launch torchrun"
        )
    _check_device(cfg.device, args.nproc)
    _check_run_dir(cfg)
    _check_layout(cfg, args.nproc)
    _check_model(cfg, err)
    _check_inputs(cfg)
    _check_tensorboard(cfg)
    argv = sys.argv[1:] if args.argv is None else args.argv
    return _launch_torchrun(args.nproc, argv, args.max_restarts)


def _check_run_dir(cfg) -> None:
    """A new run does not write over an old one, and a resume does not change the data
    order (runtime/rundir.py); the ranks check again, for runs started by torchrun."""
    from entrain.runtime.rundir import check_out, check_resume_order

    check_out(cfg)
    check_resume_order(cfg)


def _check_inputs(cfg) -> None:
    """The manifest parses and the profile fits the model: what every rank reads first, read
    once here so a mistake is one line in a second, not one per rank after start-up."""
    from entrain.cost.emulated import emulated_device
    from entrain.runtime.setup import profile_of, spec_of
    from entrain.workload.manifest import read_manifest

    read_manifest(cfg.data)
    spec = spec_of(cfg)
    profile_of(cfg, spec)
    emulated_device(cfg.device, spec)  # --device emulate:PROFILE.json: a profile of this model


def _check_tensorboard(cfg) -> None:
    """--tensorboard needs an optional package: say so before any process starts."""
    import importlib.util

    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UserError(
            "--tensorboard needs the tensorboard package: pip install 'entrain[tensorboard]'"
        )
    if cfg.tensorboard and not cfg.out:
        raise UserError("--tensorboard writes next to metrics.jsonl: give --out DIR too")


def _check_layout(cfg, nproc: int) -> None:
    """The processes hold the layout (replicas, encoder copies, LLM stages): checked once here,
    not by every rank after start-up."""
    from entrain.runtime.setup import run_layout, spec_of

    spec = spec_of(cfg)
    plan = run_layout(cfg, [e.name for e in spec.encoders], nproc)
    if plan.llm_pp > spec.llm.num_hidden_layers:
        raise UserError(
            f"--pp {plan.llm_pp}: the LLM of {spec.name!r} has only "
            f"{spec.llm.num_hidden_layers} layer(s) to split into stages"
        )


def _check_model(cfg, err: Console) -> None:
    """A model folder's config, tokenizer and every tensor's presence and shape (headers
    only), before launching: one line for a bad folder, and no rank starts on half-loaded
    weights."""
    if not os.path.isdir(cfg.model):
        return
    from entrain.runtime.source import check_weights, model_source

    source = model_source(
        cfg.model, cfg.seed, cfg.init_from, cfg.audio_from, cfg.freeze, cfg.tokenizer
    )
    source.codec()
    n = check_weights(source)
    if n:
        err.print(f"entrain: {cfg.model}: {n} tensors present with the shapes its config gives")


def _check_device(device: str, nproc: int) -> None:
    """Refuse an impossible --device before launching: one message, not one per process."""
    from entrain.runtime.device import place

    try:
        place(device, 0, nproc)
    except ValueError as e:
        raise UserError(str(e)) from None


def _launch_torchrun(nproc: int, argv: list[str], max_restarts: int = 0) -> int:
    """Re-run this command under torchrun with `nproc` processes on this machine, owning
    them: a stop signal to this process reaches every rank, and no rank outlives it."""
    import socket

    rest, skip = [], False
    for a in argv:  # drop the launcher's own flags: the children are the processes
        if skip:
            skip = False
            continue
        if a in ("--nproc", "--max-restarts"):
            skip = True
            continue
        if a.startswith(("--nproc=", "--max-restarts=")):
            continue
        rest.append(a)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        # a c10d rendezvous, not a static master address: each restart is a new round with
        # fresh keys (with a static one, a restarted rank could read the old round's peer
        # addresses and fail to connect)
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        f"entrain-{os.getpid()}-{port}",
        "--max-restarts",
        str(max_restarts),
        "-m",
        "entrain",
        *rest,
    ]
    return Launch(cmd).run()


class Launch:
    """torchrun as a child this process owns.

    - Stop signals (SIGTERM, SIGINT, SIGHUP) are forwarded to torchrun, which passes them to
      every rank; the ranks finish their step, checkpoint when due or asked, and exit. If
      they have not after `grace_s`, or on a second signal, every process of the run is
      killed. torchrun runs in a session of its own, so a Ctrl-C in the terminal reaches
      this process only and is forwarded once (not once from the terminal and once from
      torchrun).
    - If this process dies, torchrun gets SIGTERM from the kernel (Linux's parent-death
      signal) and stops the ranks the same way.
    - If torchrun dies, its ranks are re-parented to this process (a child subreaper on
      Linux), notice it (they watch their parent), stop after their step, and this process
      waits for them and reaps them: no orphan keeps training.
    """

    def __init__(self, cmd: list[str], grace_s: float = 60.0):
        self.cmd, self.grace_s = cmd, grace_s
        self.signals: list[int] = []
        self.said_stopped = False
        self.others: set[int] = set()  # children this process had before: not the run's

    def run(self) -> int:
        import signal
        import subprocess

        _become_subreaper()
        self.others = set(_children())
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            self.cmd,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,
            preexec_fn=_terminate_with_parent,
        )
        stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {sig: signal.signal(sig, self._forward) for sig in stops}
        try:
            for line in _launcher_noise_removed(self.proc.stderr):
                self.said_stopped |= line.startswith("entrain: stopped by")
                sys.stderr.write(line)
            rc = self.proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._reap_orphans()
        return self._verdict(rc)

    def _forward(self, signum: int, frame) -> None:
        import signal
        import threading

        self.signals.append(signum)
        if len(self.signals) > 1:  # asked again: stop waiting for the step to end
            _kill_tree(self.proc.pid, signal.SIGKILL)
            return
        try:
            os.kill(self.proc.pid, signum)
        except ProcessLookupError:
            pass
        timer = threading.Timer(self.grace_s, _kill_tree, (self.proc.pid, signal.SIGKILL))
        timer.daemon = True
        timer.start()

    def _reap_orphans(self) -> None:
        """Ranks whose torchrun died were re-parented here: wait for them (they stop after
        their step), then kill what is left after the grace period."""
        import signal

        deadline = time.monotonic() + self.grace_s
        while self._orphans() and time.monotonic() < deadline:
            _reap(self.others)
            time.sleep(0.2)
        for pid in self._orphans():
            _kill_tree(pid, signal.SIGKILL)
        _reap(self.others)

    def _orphans(self) -> list[int]:
        return [pid for pid in _children() if pid not in self.others]

    def _verdict(self, rc: int) -> int:
        import signal

        if self.signals:
            name = signal.Signals(self.signals[0]).name
            if not self.said_stopped:
                sys.stderr.write(f"entrain: stopped by {name} (torchrun exit code {rc})\n")
            return 128 + self.signals[0]
        if rc < 0 and not self.said_stopped:
            name = signal.Signals(-rc).name
            sys.stderr.write(f"entrain: torchrun was killed by {name}; the ranks stopped\n")
        elif rc and not self.said_stopped:
            sys.stderr.write(f"entrain: a process of this run failed (torchrun exit code {rc})\n")
        return (128 - rc) if rc < 0 else rc


def _become_subreaper() -> None:
    """Orphaned descendants are re-parented to this process instead of init (Linux)."""
    _prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


def _terminate_with_parent() -> None:
    """In the child, before exec: SIGTERM when this launcher dies (Linux)."""
    import signal

    _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _prctl(option: int, value: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def _children(parent: int | None = None, zombies: bool = False) -> list[int]:
    """Child processes of `parent` (this process by default), from /proc: live ones, or
    with `zombies` only those that have exited and wait to be reaped."""
    parent = os.getpid() if parent is None else parent
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after the command name
        if int(fields[1]) == parent and (fields[0] == "Z") == zombies:
            found.append(int(entry))
    return found


def _kill_tree(pid: int, sig: int) -> None:
    """Signal `pid` and every descendant (children first looked up, then signalled)."""
    for child in _children(pid):
        _kill_tree(child, sig)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(others: set[int]) -> None:
    """Collect the exit status of the run's finished children (orphans re-parented here
    included), not of `others`, which the caller owns."""
    for pid in _children(zombies=True):
        if pid not in others:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


_LOG_LINE = re.compile(r"^[WIE]\d{4} \d\d:\d\d:\d\d")
_SUMMARY_FIELD = re.compile(r"^\s+(rank|exitcode)\s*:\s*(-?\d+)")


def _exit_code(code: int) -> str:
    """A rank's exit code as torchrun reports it; negative: killed by that signal."""
    import signal

    if code < 0:
        try:
            return f"{signal.Signals(-code).name}"
        except ValueError:
            pass
    return str(code)


def _launcher_noise_removed(lines):
    """The ranks' stderr as it comes, less torchrun's own chatter: its log lines, the
    Python traceback it prints about itself when a rank fails or it is signalled, its
    failure summary (reduced to one line of exit codes by rank), and every rank's copy of
    an error after the first (each rank that meets a bad setting says so)."""
    held: list[str] = []
    said: set[str] = set()
    repeat = False  # inside a repeated error's indented detail lines
    summary: dict[int, int] | None = None
    rank = None
    for line in lines:
        if summary is not None:  # torchrun's "entrain FAILED" block, between rules of "="
            m = _SUMMARY_FIELD.match(line)
            if m and m.group(1) == "rank":
                rank = int(m.group(2))
            elif m and rank is not None:
                summary[rank] = int(m.group(2))
            if line.startswith("=" * 20) and summary:
                codes = ", ".join(f"rank {r}: {_exit_code(c)}" for r, c in sorted(summary.items()))
                yield f"entrain: exit codes {codes}\n"
                summary = None
            continue
        if held:
            held.append(line)
            if line[:1] not in (" ", "\t") and not line.startswith("Traceback"):
                if not line.startswith("torch.distributed.elastic."):
                    yield from held  # a rank's own traceback: keep it
                held = []
            continue
        if repeat and line.startswith("  "):
            continue
        repeat = False
        if line.startswith("Traceback (most recent call last):"):
            held = [line]
        elif line.startswith("=" * 20):
            summary = {}
        elif line.startswith("entrain: error:"):
            repeat = line in said
            if not repeat:
                said.add(line)
                yield line
        elif "resource_tracker" in line and "leaked" in line:
            repeat = True  # a killed rank's semaphores, nothing to act on; and its source line
        elif not _LOG_LINE.match(line) and not line.startswith("*****"):
            yield line
    yield from held


def cmd_profile(args: argparse.Namespace, err: Console) -> int:
    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    if args.runs < 4:
        raise UserError(f"--runs must be >= 4 (the fit has 4 terms), got {args.runs}")
    if args.max_samples < 1:
        raise UserError(f"--max-samples must be >= 1, got {args.max_samples}")
    if "RANK" not in os.environ and args.nproc > 1:
        _check_device(args.device, args.nproc)
        return _launch_torchrun(args.nproc, sys.argv[1:] if args.argv is None else args.argv)
    from entrain.models.load import load_spec
    from entrain.runtime.profile import ProfileConfig, profile_main

    spec = load_spec(args.model)
    workload, source = _profile_sizes(args, spec)
    cfg = ProfileConfig(
        model=args.model,
        runs=args.runs,
        max_samples=args.max_samples,
        seed=args.seed,
        device=args.device,
    )
    profile = profile_main(cfg, spec, workload, pin_cores=args.pin_cores, console=err)
    if profile is None:  # not rank 0
        return 0
    profile.host["sizes_from"] = source
    profile.save(args.output)
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
        return 0
    _print_profile(profile, args.output, source)
    return 0


def _profile_sizes(args: argparse.Namespace, spec):
    """The sample sizes to profile on: the user's manifest, or a synthetic trace."""
    if args.data:
        from entrain.workload.manifest import read_manifest

        return read_manifest(args.data), f"manifest {args.data}"
    from entrain.workload.traces import generate_workload

    kind = args.trace or (
        "omni" if any(e.name == "audio" for e in spec.encoders) else "interleaved"
    )
    return generate_workload(kind, args.samples, seed=args.seed), f"synthetic trace {kind}"


def _print_profile(profile, path: str, source: str) -> None:
    con = stdout_console()
    table = Table(title=f"measured costs of {profile.model} (seconds; x = tokens of a unit)")
    for col in (
        "module",
        "pass",
        "a (per token)",
        "b (per token^2)",
        "c0 (per unit)",
        "per run",
        "fit error (rms / max)",
        "runs",
    ):
        table.add_column(col, justify="left" if col in ("module", "pass") else "right")
    for section, fits in (("", profile.modules), (" projector", profile.llm_projectors)):
        for m, kinds in fits.items():
            for kind, f in kinds.items():
                c = f.coeffs
                table.add_row(
                    m + section,
                    kind,
                    f"{c.a:.3g}",
                    f"{c.b:.3g}",
                    f"{c.c0:.3g}",
                    f"{c.call:.3g}",
                    f"{100 * f.rel_rms:.1f}% / {100 * f.max_rel:.1f}%",
                    str(f.runs),
                )
    con.print(table)
    steps = ", ".join(f"{m} {1e3 * s:.2f} ms" for m, s in profile.step.items())
    con.print(f"optimizer step: {steps}")
    con.print(
        f"compute: {profile.flops / 1e9:,.1f} GFLOP/s achieved per process "
        f"({profile.host.get('threads_per_process')} thread(s)); sizes from {source}"
    )
    if profile.p2p:
        p = profile.p2p
        con.print(
            f"p2p between 2 of {profile.devices} processes: receive {1e3 * p.latency:.3f} ms + "
            f"bytes / {p.bandwidth / 1e9:.2f} GB/s (fit error {100 * p.rel_rms:.1f}%), "
            f"send {1e3 * p.send:.3f} ms"
        )
    else:
        con.print("p2p: not measured (one process; use --nproc 2 or more)")
    con.print(f"profile written to {path}; use it with --profile in simulate, plan and train")


def add_profile_parser(sub) -> argparse.ArgumentParser:
    """`entrain profile`: time the real modules and fit the cost model."""
    pr = sub.add_parser(
        "profile",
        help="time the real modules here and fit the cost model (for --profile)",
        description="Run the model's real modules on whole microbatches of varied sizes (drawn "
        "from --data, or from a synthetic trace), time forward and backward apart, and "
        "fit each module's cost a*x + b*x^2 + c0 per unit plus a constant per run by least "
        "squares. With --nproc 2 or more, every process profiles at once (the machine is "
        "as busy as in training) and two of them time real sends for the link. The "
        "profile replaces the FLOPs model in simulate, plan and train (--profile).",
    )
    pr.add_argument(
        "--model",
        default="tiny",
        help="model preset, spec file or Hugging Face model folder (its architecture, random "
        "weights: values do not change the time of dense math; default tiny)",
    )
    pr.add_argument("-o", "--output", default="profile.json", help="where to write the profile")
    src = pr.add_mutually_exclusive_group()
    src.add_argument("--data", help="manifest whose sample sizes to profile on (recommended)")
    src.add_argument(
        "--trace",
        choices=list(GENERATORS),
        help="synthetic trace to draw sizes from (default: omni with audio, else interleaved)",
    )
    pr.add_argument("--samples", type=int, default=256, help="trace samples (default 256)")
    pr.add_argument(
        "--runs", type=int, default=40, help="timed microbatches per module and process (40)"
    )
    pr.add_argument(
        "--max-samples", type=int, default=8, help="most samples in a microbatch (default 8)"
    )
    pr.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    pr.add_argument("--nproc", type=int, default=2, help="processes (default 2; 1 skips the link)")
    pr.add_argument("--pin-cores", action="store_true", help="pin each process to its own core")
    device_flag(pr, "where to time the modules (profile where you train)")
    pr.add_argument("--json", action="store_true", help="print the profile as JSON")
    pr.set_defaults(func=cmd_profile, argv=None)
    return pr

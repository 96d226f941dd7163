"""`entrain plan` and `entrain simulate`."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from entrain.cli_common import UserError, add_policies, progress_bar, stdout_console
from entrain.schedule import POLICIES


def _planner_inputs(args: argparse.Namespace, err: Console):
    from entrain.cost.hardware import get_hardware
    from entrain.models.load import load_spec
    from entrain.plan.memory import MemorySettings
    from entrain.plan.planner import PlannerConfig
    from entrain.planning import load_batches
    from entrain.workload.manifest import ShortManifestError

    if args.gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {args.gpus}")
    spec = load_spec(args.model)
    hw = get_hardware(args.hardware)
    model = None
    if args.profile:  # measured seconds and the measured machine instead of FLOPs
        from entrain.cost.profile import load_profile

        profile = load_profile(args.profile, spec)
        model, hw = profile.cost_model(), profile.hardware(fallback=hw)
    gb = args.global_batch or 16 * args.gpus
    with progress_bar("reading samples", args.iterations * gb, err) as advance:
        try:
            batches = load_batches(
                args.manifest, spec, gb, args.iterations, cost_model=model, on_progress=advance
            )
        except ShortManifestError as e:
            if args.global_batch:
                raise
            raise ShortManifestError(e.path, e.samples, gb, " (16 per GPU, the default)") from None
    cfg = PlannerConfig(
        gpus=args.gpus,
        global_batch=gb,
        microbatch_samples=args.microbatch_size,
        policy=getattr(args, "policy", "entrain"),
        tp_options=_tp_options(args.tp),
        memory=MemorySettings(precision=args.precision, recompute={"*": args.recompute == "full"}),
    )
    return spec, hw, batches, cfg


def _tp_options(text: str) -> tuple[int, ...]:
    try:
        tps = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise UserError(f"--tp must be a comma-separated list of integers, got {text!r}") from None
    if not tps or tps[0] < 1:
        raise UserError(f"--tp must list degrees >= 1, got {text!r}")
    return tps


def train_flags(plan, memory=None, policy: str = "entrain") -> str | None:
    """The `entrain train` flags that run `plan` under `policy` as its memory was planned
    (None: the runtime cannot, TP > 1)."""
    if plan.llm_tp != 1 or any(t != 1 for t in plan.encoder_tp.values()):
        return None
    flags = [f"--nproc {plan.world_size}", f"--dp {plan.dp}", f"--pp {plan.llm_pp}",
             f"--microbatches {plan.microbatches}"]  # fmt: skip
    if memory is not None:
        flags.append(f"--precision {memory.precision}")
        flags.append(f"--recompute {'full' if memory.recomputes('llm') else 'none'}")
    copies = ",".join(f"{e}={n}" for e, n in plan.encoder_dp.items() if n > 1)
    if copies:
        flags.append(f"--encoder-copies {copies}")
    if policy != "entrain":  # lookahead, pool and order are Entrain's
        return " ".join([*flags, f"--policy {policy}"])
    ahead = plan.encoder_lookahead
    flags.append(f"--lookahead {'unlimited' if ahead is None else ahead}")
    if plan.encoder_pool is not None:
        flags.append(f"--pool {plan.encoder_pool}")
    if plan.encoder_order != "light-first":
        flags.append(f"--microbatch-order {plan.encoder_order}")
    return " ".join(flags)


def _plan_now(spec, batches, hw, cfg, err: Console):
    """Plan, saying up front how large the search is (and whether it had to be narrowed to
    finish in minutes), with a progress bar over its simulations."""
    from entrain.planning import make_planner

    planner = make_planner(spec, batches, hw, cfg)
    search = planner.search()
    _say_search(search, "planning", err)
    with progress_bar("simulating plans", search.simulations, err) as advance:
        return planner, planner.plan(advance, search)


def _say_search(search, label: str, err: Console) -> None:
    """One stderr line on the search's size, and a note when it was narrowed."""
    err.print(f"{label}: {escape(search.describe())}", highlight=False, soft_wrap=True)
    if search.narrowed:
        err.print(f"[yellow]note:[/] {escape(search.narrowed)}", highlight=False, soft_wrap=True)


def _compare_now(spec, batches, hw, cfg, err: Console) -> dict:
    """Plan for every policy on the same batches, saying each search's size up front, with
    one progress bar over all their simulations; `compare_policies`' data."""
    from entrain.planning import compare_policies, policy_planners

    planners = policy_planners(spec, batches, hw, cfg, tuple(POLICIES))
    searches = {p: planner.search() for p, planner in planners.items()}
    for p, search in searches.items():
        _say_search(search, f"planning {p}", err)
    total = sum(s.simulations for s in searches.values())
    with progress_bar("simulating plans", total, err) as advance:
        results = {p: planners[p].plan(advance, searches[p]) for p in planners}
    return compare_policies(results)


def cmd_compare(args: argparse.Namespace, err: Console) -> int:
    """`entrain plan --compare`: every policy at its own best static plan."""
    if args.output or args.plot:
        raise UserError(
            "--compare writes no plan file or figure: run `entrain plan --policy P -o FILE` "
            "for the policy you choose (use --json for the comparison as data)"
        )
    spec, hw, batches, cfg = _planner_inputs(args, err)
    cmp = _compare_now(spec, batches, hw, cfg, err)
    out = {
        "model": spec.name,
        "hardware": hw.name,
        "gpus": cfg.gpus,
        "global_batch": cfg.global_batch,
        "iterations": len(batches),
        **cmp,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    con = stdout_console()
    con.print(_compare_table(out))
    best, gain = out["best_baseline"], out["entrain_over_best_baseline"]
    con.print(
        f"[bold]entrain vs best baseline[/] ({best}, at its own plan): {gain:.3f}x",
        highlight=False,
    )
    return 0


COMPARE_COLUMNS = ("policy", "plan", "iter time (s)", "samples/s", "vs sequential",
                   "vs best baseline")  # fmt: skip


def _compare_table(out: dict) -> Table:
    """One row per policy at its own plan; Entrain's row in green."""
    pol, best = out["policies"], out["best_baseline"]
    table = Table(
        title=f"each policy at its own best static plan: {out['model']}, {out['gpus']} x "
        f"{out['hardware']}, global batch {out['global_batch']}, {out['iterations']} batch(es)"
    )
    for col in COMPARE_COLUMNS:
        table.add_column(col, justify="left" if col in ("policy", "plan") else "right")
    for p, m in pol.items():
        table.add_row(
            p,
            escape(m["plan_description"]),
            f"{m['iter_time']:.3f}",
            f"{m['throughput']['samples_per_s']:,.1f}",
            f"{m['speedup'].get('sequential', 1.0):.2f}x",
            f"{m['speedup'].get(best, 1.0):.2f}x",
            style="green" if p == "entrain" else None,
        )
    return table


def cmd_plan(args: argparse.Namespace, err: Console) -> int:
    if args.compare:
        return cmd_compare(args, err)
    spec, hw, batches, cfg = _planner_inputs(args, err)
    _, res = _plan_now(spec, batches, hw, cfg, err)
    out = {
        "model": spec.name,
        "hardware": hw.name,
        "gpus": cfg.gpus,
        "global_batch": cfg.global_batch,
        "policy": cfg.policy,
        **res.to_dict(),
        "train_flags": train_flags(res.static.plan, cfg.memory, cfg.policy),
    }
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    if args.plot:
        from entrain.cost.batch import CostedBatch
        from entrain.plan.macro import ratio_cv
        from entrain.report.plots import plan_figure

        pool = CostedBatch.concat(batches)
        sizes = [n for n in (8, 16, 32, 64, 128, 256, 512, 1024, 2048) if n <= pool.n_samples // 2]
        plan_figure(out, ratio_cv(pool, sizes), args.plot)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    con = stdout_console()
    con.print(
        f"[bold]static plan[/] for {cfg.gpus} x {hw.name}, {spec.name}, global batch "
        f"{cfg.global_batch}, policy {cfg.policy}: {escape(res.static.plan.describe())}"
    )
    con.print(
        f"  simulated throughput {res.static_throughput:,.1f} samples/s; dynamic oracle "
        f"{res.oracle_throughput:,.1f}; static/oracle = {res.static_over_oracle:.3f}"
    )
    con.print(
        f"  {res.feasible} feasible plans, {len(res.simulated)} simulated "
        f"on {len(batches)} batch(es)"
    )
    flags = train_flags(res.static.plan, cfg.memory, cfg.policy)
    if flags:
        con.print(f"  run it: entrain train ... {flags}")
    else:
        con.print("  (tensor parallelism: simulated only; `entrain train` runs TP 1 plans)")
    if args.output:
        con.print(f"  plan written to {escape(str(args.output))}")
    if args.plot:
        con.print(f"  figure written to {escape(str(args.plot))}")
    return 0


def _load_plan(path: str):
    """The plan in a file from `entrain plan -o` (or a bare plan object), and the policy it
    was chosen for (None when the file does not say)."""
    from entrain.schedule.parallel import ParallelPlan

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    policy = data.get("policy") if isinstance(data, dict) and "plan" in data else None
    data = data.get("plan", data) if isinstance(data, dict) else data
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a plan object")
    known = isinstance(policy, str) and policy in POLICIES
    return ParallelPlan.from_dict(data), policy if known else None


def cmd_simulate(args: argparse.Namespace, err: Console) -> int:
    from entrain.planning import make_planner, simulate_policies
    from entrain.report.trace import write_chrome_trace

    spec, hw, batches, cfg = _planner_inputs(args, err)
    if args.plan:
        plan, chosen_for = _load_plan(args.plan)
        plan.check_modules(tuple(e.name for e in spec.encoders))
        if plan.world_size != cfg.gpus:
            raise UserError(f"the plan uses {plan.world_size} GPUs but --gpus is {cfg.gpus}")
        planner = make_planner(spec, batches, hw, cfg)
    else:
        planner, res = _plan_now(spec, batches, hw, cfg, err)
        plan, chosen_for = res.static.plan, cfg.policy
    policies = tuple(dict.fromkeys(args.policies))
    trace_policy = "entrain" if "entrain" in policies else policies[0]
    with progress_bar("simulating", None, err):
        results, events = simulate_policies(
            planner, plan, policies, trace_policy if args.trace else None
        )
    if args.trace:
        write_chrome_trace(events, args.trace, name=trace_policy)
    out = {
        "model": spec.name,
        "hardware": hw.name,
        "gpus": cfg.gpus,
        "global_batch": cfg.global_batch,
        "iterations": len(batches),
        "plan": plan.to_dict(),
        "plan_description": plan.describe(),
        "shared_plan": True,  # every policy on this one plan: see `entrain plan --compare`
        "plan_chosen_for": chosen_for,
        "policies": results,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    table = Table(
        title=f"{spec.name} on {escape(plan.describe())}, {hw.name}, "
        f"global batch {cfg.global_batch}, {len(batches)} iteration(s)"
    )
    for col in ("policy", "iter time (s)", "samples/s", "tokens/s", "bubbles", "vs sequential"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for p, m in results.items():
        vs = m["speedup"].get("sequential")
        table.add_row(
            p,
            f"{m['iter_time']:.3f}",
            f"{m['throughput']['samples_per_s']:,.1f}",
            f"{m['throughput']['tokens_per_s']:,.0f}",
            f"{100 * m['bubble_fraction']:.1f}%",
            "1.00x" if p == "sequential" else (f"{vs:.2f}x" if vs else "-"),
            style="green" if p == "entrain" else None,
        )
    con = stdout_console()
    con.print(table)
    con.print(_shared_plan_note(chosen_for, args.plan), highlight=False)
    if args.trace:
        err.print(
            f"trace of {trace_policy}, first batch, written to {args.trace} "
            "(open it in ui.perfetto.dev)"
        )
    return 0


def _shared_plan_note(chosen_for: str | None, path: str | None) -> str:
    """Why a baseline's row may undersell it: it ran on a plan chosen for another policy."""
    source = f"chosen for {chosen_for}" if chosen_for else f"from {path}"
    return (
        f"note: every policy ran on this one plan ({escape(source)}); `entrain plan --compare` "
        "gives each policy its own best plan"
    )


def _add_planner_flags(sp: argparse.ArgumentParser) -> None:
    """What plan and simulate both read: the data, the model, the cluster, the run's sizes."""
    sp.add_argument("manifest", help="JSON Lines manifest")
    sp.add_argument(
        "--model", required=True, help="model preset, spec file or Hugging Face model folder"
    )
    sp.add_argument("--gpus", type=int, required=True, help="GPUs G the plan uses")
    sp.add_argument(
        "--hardware", default="h100", help="hardware profile: h100, h200, a100 (default h100)"
    )
    sp.add_argument(
        "--profile",
        default=None,
        help="measured profile (entrain profile): its seconds and machine replace the "
        "FLOPs model and --hardware",
    )
    sp.add_argument(
        "--global-batch",
        type=int,
        default=None,
        help="samples per iteration (default 16 per GPU); the manifest must hold at least one",
    )
    sp.add_argument(
        "--microbatch-size",
        type=float,
        default=16.0,
        help="samples per microbatch: ~16 is the wide regime, 1-2 narrow (default 16)",
    )
    sp.add_argument(
        "--iterations", type=int, default=4, help="global batches to sample (default 4)"
    )
    sp.add_argument(
        "--precision",
        default="bf16",
        choices=("bf16", "fp32"),
        help="the run's precision, for its memory (default bf16, as on GPUs)",
    )
    sp.add_argument(
        "--recompute",
        default="full",
        choices=("full", "none"),
        help="whether the run recomputes activations, for its memory (default full)",
    )
    sp.add_argument(
        "--tp",
        default="1",
        metavar="DEGREES",
        help="tensor-parallel degrees to consider, e.g. 1,2,4,8 (default 1: the layouts "
        "`entrain train` runs; larger degrees are simulated only)",
    )
    sp.add_argument("--json", action="store_true", help="print one JSON object")


def add_plan_parser(sub) -> argparse.ArgumentParser:
    """`entrain plan MANIFEST --model M --gpus G`: one static plan for a cluster."""
    sp = sub.add_parser(
        "plan",
        help="choose one static parallel plan for a cluster",
        description="Enumerate the plans (GPUs per encoder, LLM pipeline and tensor degrees, "
        "data parallelism, Entrain's deferral depth) that fit the GPUs and their memory, "
        "simulate the most promising on sampled global batches and keep the fastest. Also "
        "reports the dynamic oracle, which re-plans for every batch, and static_over_oracle.",
    )
    _add_planner_flags(sp)
    which = sp.add_mutually_exclusive_group()
    which.add_argument(
        "--policy",
        default="entrain",
        choices=list(POLICIES),
        help="policy the plans are simulated with (default entrain)",
    )
    which.add_argument(
        "--compare",
        action="store_true",
        help="plan for every policy, each at its own best plan, and compare them side by side",
    )
    sp.add_argument("-o", "--output", help="write the plan (JSON) here, for simulate --plan")
    sp.add_argument("--plot", help="save the static-vs-oracle figure (PNG) here")
    sp.set_defaults(func=cmd_plan)
    return sp


def add_simulate_parser(sub) -> argparse.ArgumentParser:
    """`entrain simulate MANIFEST --model M --gpus G`: every policy on one plan."""
    sp = sub.add_parser(
        "simulate",
        help="simulate every policy on a plan",
        description="Simulate one training iteration per sampled global batch for every "
        "policy, on a plan from --plan or chosen now, and report iteration time, throughput, "
        "bubbles and speed-ups. Every policy runs on that one plan; `entrain plan --compare` "
        "gives each policy its own best plan.",
    )
    _add_planner_flags(sp)
    sp.add_argument("--plan", help="plan JSON from `entrain plan -o` (default: plan now)")
    add_policies(sp, "simulate")
    sp.add_argument("--trace", help="write a Chrome/Perfetto trace of entrain's first batch here")
    sp.set_defaults(func=cmd_simulate)
    return sp

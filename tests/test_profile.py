"""The profiler's fit (cost/fit.py), the profile file (cost/profile.py), what the simulator
does with measured costs, the replay of real runs (sim/replay.py), and the commands that
tie them together (`entrain profile`, `--profile`, `entrain runs --simulate`)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from entrain.cli import build_parser, main
from entrain.cost.batch import CostedBatch, UnitTable, cost_batch
from entrain.cost.fit import FitResult, features, fit_coeffs, nonnegative_lstsq, predict
from entrain.cost.flops import CostCoeffs
from entrain.cost.hardware import Hardware
from entrain.cost.profile import P2PFit, Profile, ProfileError, load_profile
from entrain.models.load import load_spec
from entrain.models.spec import ModelSpec, TransformerSpec, VisionSpec
from entrain.schedule import assign
from entrain.schedule.assignment import Assignment
from entrain.schedule.parallel import ParallelPlan
from entrain.schedule.steps import StepRecipe
from entrain.sim.lookahead import choose_lookahead
from entrain.sim.replay import replay_run
from entrain.sim.simulator import simulate
from entrain.workload.columnar import batch_indices
from entrain.workload.manifest import read_manifest, write_manifest
from entrain.workload.traces import generate_workload

ROOT = Path(__file__).resolve().parents[1]
TINY_VISION = str(ROOT / "benchmarks" / "tiny-vision.yaml")
TRUE = CostCoeffs(a=2e-5, b=3e-8, c0=2e-3, call=2e-3)


def _runs(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Microbatches of 1-8 units of 10-600 tokens: counts and sizes vary apart."""
    return [rng.integers(10, 600, size=int(rng.integers(1, 9))) for _ in range(n)]


# ------------------------------------------------------------------------------------ fitting


def test_fit_recovers_exact_coefficients_without_noise():
    tokens = _runs(np.random.default_rng(0), 40)
    fit = fit_coeffs(tokens, predict(TRUE, tokens))
    for t in ("a", "b", "c0", "call"):
        assert getattr(fit.coeffs, t) == pytest.approx(getattr(TRUE, t), rel=1e-6)
    assert fit.rel_rms < 1e-9 and fit.max_rel < 1e-9 and fit.runs == 40


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_known_coefficients_from_noisy_timings(seed):
    rng = np.random.default_rng(seed)
    tokens = _runs(rng, 300)
    noisy = predict(TRUE, tokens) * rng.normal(1.0, 0.05, size=len(tokens))
    fit = fit_coeffs(tokens, noisy)
    # each coefficient within 20% (the per-unit and per-run constants trade off against
    # each other), and the fit reports the noise it saw
    for t in ("a", "b", "c0", "call"):
        assert getattr(fit.coeffs, t) == pytest.approx(getattr(TRUE, t), rel=0.2), t
    assert 0.03 < fit.rel_rms < 0.07
    # on new microbatches the fitted model predicts the true cost far better than one timing
    fresh = _runs(rng, 200)
    err = np.abs(predict(fit.coeffs, fresh) / predict(TRUE, fresh) - 1)
    assert np.median(err) < 0.02 and err.max() < 0.1


def test_fit_keeps_every_coefficient_nonnegative():
    # time falls slightly with size: unconstrained least squares would make `a` negative
    tokens = [np.array([x]) for x in range(10, 400, 10)]
    secs = [1e-3 - 1e-7 * x for x in range(10, 400, 10)]
    fit = fit_coeffs(tokens, secs)
    assert all(getattr(fit.coeffs, t) >= 0 for t in ("a", "b", "c0", "call"))


def test_nonnegative_lstsq_is_the_best_nonnegative_solution():
    rng = np.random.default_rng(3)
    for _ in range(20):
        A = rng.normal(size=(12, 4))
        y = rng.normal(size=12)
        c = nonnegative_lstsq(A, y)
        assert (c >= 0).all()
        best = np.inf
        for cols in itertools.chain.from_iterable(
            itertools.combinations(range(4), k) for k in range(5)
        ):
            x = np.zeros(4)
            if cols:
                x[list(cols)] = np.linalg.lstsq(A[:, cols], y, rcond=None)[0]
            if (x >= -1e-12).all():
                best = min(best, float(np.linalg.norm(A @ x - y)))
        assert np.linalg.norm(A @ c - y) <= best + 1e-9


def test_fit_subset_of_terms_leaves_the_others_zero():
    tokens = [np.array([float(n)]) for n in (1e3, 1e4, 1e5, 1e6)]
    fit = fit_coeffs(tokens, [3e-4 + n / 2e9 for n in (1e3, 1e4, 1e5, 1e6)], terms=("a", "call"))
    assert fit.coeffs.call == pytest.approx(3e-4, rel=1e-6)
    assert 1 / fit.coeffs.a == pytest.approx(2e9, rel=1e-6)
    assert fit.coeffs.b == 0 and fit.coeffs.c0 == 0


@pytest.mark.parametrize(
    "tokens,secs,terms,match",
    [
        ([np.array([1])] * 4, [1.0] * 3, ("a",), "4 runs but 3 timings"),
        ([np.array([1])] * 2, [1.0] * 2, ("a", "b", "c0"), "at least"),
        ([np.array([1])] * 4, [1.0, 0.0, 1.0, 1.0], ("a",), "positive"),
        ([np.array([1])] * 4, [1.0] * 4, ("a", "d"), "unknown terms"),
    ],
)
def test_fit_rejects_bad_input(tokens, secs, terms, match):
    with pytest.raises(ValueError, match=match):
        fit_coeffs(tokens, secs, terms)


def test_features_of_an_empty_run_are_zero():
    assert features([np.array([], dtype=np.int64)]).tolist() == [[0.0, 0.0, 0.0, 0.0]]


# ------------------------------------------------------------------------------- profile file


def _fit(a: float, call: float = 0.0) -> FitResult:
    return FitResult(CostCoeffs(a=a, call=call), rel_rms=0.05, max_rel=0.1, runs=40)


def _profile(p2p: bool = True) -> Profile:
    return Profile(
        model="tiny-vision",
        modules={
            "vision": {"forward": _fit(1e-5, 2e-3), "backward": _fit(2e-5, 1e-3)},
            "llm": {"forward": _fit(3e-5, 1e-3), "backward": _fit(6e-5, 5e-4)},
        },
        step={"vision": 1e-3, "llm": 2e-3},
        flops=3e10,
        memory_bytes=8e9,
        devices=2,
        p2p=P2PFit(latency=3e-4, bandwidth=2e9, send=4e-4, rel_rms=0.1, runs=35) if p2p else None,
    )


def test_profile_round_trips_through_json(tmp_path):
    path = tmp_path / "p.json"
    _profile().save(path)
    back = load_profile(path)
    assert back.to_dict() == _profile().to_dict()
    model = back.cost_model()
    assert model.unit == "s" and model.step == {"vision": 1e-3, "llm": 2e-3}
    assert model["vision"].forward.call == 2e-3
    hw = back.hardware()
    assert (hw.latency, hw.intra_node_bw, hw.send_cost) == (3e-4, 2e9, 4e-4)
    assert hw.blocking_p2p and hw.bytes_per_value == 4 and hw.gpus_per_node == 2


def test_profile_without_link_needs_a_fallback():
    p = _profile(p2p=False)
    with pytest.raises(ProfileError, match="no p2p measurement"):
        p.hardware()
    fallback = Hardware(
        name="x", peak_flops=1, memory_bytes=1, intra_node_bw=5.0, inter_node_bw=1.0
    )
    hw = p.hardware(fallback)
    assert (hw.intra_node_bw, hw.inter_node_bw, hw.blocking_p2p) == (5.0, 1.0, False)


def _broken(tmp_path: Path, edit) -> Path:
    d = _profile().to_dict()
    edit(d)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d.update(entrain_profile=7), "format 1"),
        (lambda d: d["modules"]["llm"]["forward"].pop("a"), r"modules.llm.forward: missing a"),
        (lambda d: d["modules"]["vision"]["backward"].update(b=-1), r"vision.backward.b: must be"),
        (lambda d: d["modules"]["llm"].update(sideways={}), "unknown key"),
        (lambda d: d["modules"].pop("llm"), "missing llm"),
        (lambda d: d["hardware"]["p2p"].update(bandwidth=0), "p2p.bandwidth: must be positive"),
        (lambda d: d["hardware"].update(flops="fast"), "hardware.flops: expected a finite"),
        (lambda d: d.update(step=[1]), "step: expected an object"),
    ],
)
def test_bad_profiles_name_the_field(tmp_path, edit, match):
    with pytest.raises(ProfileError, match=match):
        load_profile(_broken(tmp_path, edit))


def test_unreadable_profiles(tmp_path):
    with pytest.raises(ProfileError, match="no such file"):
        load_profile(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ProfileError, match="not a JSON profile"):
        load_profile(tmp_path / "bad.json")


def test_profile_of_another_model_is_refused():
    with pytest.raises(ProfileError, match="profiled model 'tiny-vision'"):
        _profile().check_spec(load_spec("tiny"))
    _profile().check_spec(load_spec(TINY_VISION))


# ------------------------------------------------- the simulator with measured costs, by hand


def _vision_spec() -> ModelSpec:
    t = TransformerSpec(
        hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    enc = VisionSpec(encoder=t, projector_hidden=8)
    return ModelSpec(name="v", llm=t, encoders=(enc,))


def _one_sample_batch() -> CostedBatch:
    one = np.array([0])
    units = UnitTable(one, one, np.array([4]), np.array([2]), np.array([1.0]), np.array([2.0]))
    return CostedBatch(
        n_samples=1,
        text_tokens=np.array([4]),
        llm_tokens=np.array([6]),
        llm_fwd=np.array([3.0]),
        llm_bwd=np.array([4.0]),
        units={"vision": units},
        call_cost={"vision": (0.5, 0.25), "llm": (0.1, 0.2)},
        step_cost={"vision": 0.7, "llm": 0.3},
        unit="s",
    )


@pytest.mark.parametrize("blocking,expected", [(True, 11.87), (False, 11.85)])
def test_per_run_costs_optimizer_step_and_p2p_by_hand(blocking, expected):
    """encoder F (1 + 0.5), LLM F (3 + 0.1), LLM B (4 + 0.2), encoder B (2 + 0.25), then the
    encoder's optimizer step (0.7). Two transfers of 0.05 s: waits, or (blocking) busy time
    of the receiver plus 0.01 s of the sender each."""
    hw = Hardware(
        name="x",
        peak_flops=1,
        memory_bytes=1e12,
        intra_node_bw=1e30,
        inter_node_bw=1e30,
        latency=0.05,
        send_cost=0.01,
        blocking_p2p=blocking,
    )
    batch = _one_sample_batch()
    plan = ParallelPlan(dp=1, llm_pp=1, microbatches=1, encoder_tp={"vision": 1})
    asg = Assignment.coupled(batch, 1, 1, np.array([0]))
    res = simulate(batch, asg, _vision_spec(), plan, hw, record_events=True)
    assert res.iter_time == pytest.approx(expected)
    ev = {(d, a): (s, e) for d, a, s, e in res.events}
    if blocking:
        assert ev[("vision/r0", "F0")] == pytest.approx((0.0, 1.51))
        assert ev[("llm.s0/r0", "F0")] == pytest.approx((1.51, 4.66))
        assert ev[("vision/r0", "B0")] == pytest.approx((8.87, 11.17))
    else:
        assert ev[("llm.s0/r0", "F0")] == pytest.approx((1.55, 4.65))


def test_choose_lookahead_picks_the_fastest_candidate():
    spec = load_spec(TINY_VISION)
    model = _profile().cost_model()
    w = generate_workload("llava-instruct", 64, seed=1)
    batches = [cost_batch(w.slice(i * 32, (i + 1) * 32), spec, model) for i in range(2)]
    plan = ParallelPlan(dp=1, llm_pp=1, microbatches=4, encoder_tp={"vision": 1})
    recipe = StepRecipe(spec, global_batch=32, dp=plan.dp, microbatches=plan.microbatches)
    best, times = choose_lookahead(recipe, batches, plan, _profile().hardware())
    assert set(times) == {0, 1, 2, None}
    assert times[best] == min(times.values())


# ------------------------------------------------------------------------------------ replay


def _run_dir(tmp_path: Path, policy: str = "entrain") -> tuple[Path, Path]:
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, generate_workload("llava-instruct", 48, seed=4))
    profile = tmp_path / "profile.json"
    _profile().save(profile)
    run = tmp_path / "run"
    run.mkdir()
    plan = ParallelPlan(dp=1, llm_pp=1, microbatches=4, encoder_tp={"vision": 1})
    cfg = {
        "model": TINY_VISION,
        "data": str(manifest),
        "policy": policy,
        "global_batch": 16,
        "seed": 0,
        "shuffle": True,
        "lookahead": 1,
        "pool": None,
        "profile": str(profile),
        "plan": plan.to_dict(),
    }
    (run / "config.json").write_text(json.dumps(cfg))
    rows = [{"step": i, "iter_time": 0.5 + 0.1 * i} for i in range(5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run, profile


def test_replay_simulates_each_step_as_the_runtime_assigned_it(tmp_path):
    run, profile = _run_dir(tmp_path)
    rep = replay_run(run, warmup=1)
    spec, w = load_spec(TINY_VISION), read_manifest(tmp_path / "m.jsonl")
    prof = load_profile(profile)
    plan = ParallelPlan(dp=1, llm_pp=1, microbatches=4, encoder_tp={"vision": 1})
    for s in rep.steps:
        b = cost_batch(w.take(batch_indices(len(w), s.step, 16, 0, True)), spec, prof.cost_model())
        want = simulate(b, assign("entrain", b, 1, 4, 1, None), spec, plan, prof.hardware())
        assert s.simulated == pytest.approx(want.iter_time)
    assert [s.measured for s in rep.steps] == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
    assert rep.measured == pytest.approx(0.75)  # median after the warm-up step
    assert rep.error == pytest.approx((rep.simulated - 0.75) / 0.75)


def test_replay_needs_run_files_and_a_profile(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        replay_run(tmp_path)
    run, _ = _run_dir(tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    cfg["profile"] = None
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="trained without --profile"):
        replay_run(run)


# ---------------------------------------------------------------------------------- commands


@pytest.mark.parametrize(
    "text,value", [("auto", "auto"), ("unlimited", None), ("-1", None), ("0", 0), ("3", 3)]
)
def test_lookahead_option(text, value):
    args = build_parser().parse_args(["train", "--data", "x", "--lookahead", text])
    assert args.lookahead == value


@pytest.mark.parametrize("text", ["-2", "soon"])
def test_bad_lookahead_option(text, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "x", "--lookahead", text])
    assert "auto, unlimited or N >= 0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    from entrain.runtime.demo_data import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("data"), 32, seed=5, audio_share=0.0)


def _entrain(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, "-m", "entrain", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_profile_one_process_then_simulate_with_it(demo, tmp_path, capsys):
    out = tmp_path / "p.json"
    argv = ["profile", "--model", TINY_VISION, "--data", str(demo), "--nproc", "1"]
    argv += ["--runs", "6", "--max-samples", "3", "-o", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "vision" in text and "fit error" in text and "p2p: not measured" in text
    prof = load_profile(out)
    assert prof.p2p is None and prof.devices == 1 and prof.flops > 0
    assert set(prof.modules) == {"vision", "llm"}
    assert prof.modules["llm"]["forward"].runs == 6
    assert all(f.coeffs(np.array([100])).sum() > 0 for f in [prof.modules["llm"]["backward"]])
    argv = ["simulate", str(demo), "--model", TINY_VISION, "--gpus", "2", "--global-batch", "8"]
    argv += ["--microbatch-size", "2", "--iterations", "2", "--profile", str(out), "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["hardware"].startswith("profile:")
    assert res["policies"]["entrain"]["iter_time"] > 0
    # the profile is of tiny-vision: another model is refused with a message, not a traceback
    argv[argv.index(TINY_VISION)] = "tiny"
    assert main(argv) == 2
    assert "profiled model 'tiny-vision'" in capsys.readouterr().err


def test_profile_two_processes_train_with_it_and_replay(demo, tmp_path):
    """The real path: a 2-process profile measures the link; a 2-rank run balances with it
    and picks its lookahead; `entrain runs --simulate` sets measured against simulated."""
    prof = tmp_path / "p.json"
    _entrain("profile", "--model", TINY_VISION, "--data", str(demo), "--runs", "4", "-o", str(prof))
    p = load_profile(prof)
    assert p.devices == 2 and p.p2p is not None and p.p2p.bandwidth > 0 and p.p2p.runs > 0
    out = tmp_path / "run"
    _entrain(
        "train", "--model", TINY_VISION, "--data", str(demo), "--nproc", "2", "--steps", "3",
        "--global-batch", "8", "--microbatches", "4", "--profile", str(prof), "--out", str(out),
    )  # fmt: skip
    from entrain.config import read_run_config

    cfg = read_run_config(out).config  # typed, as replay reads it
    assert cfg.lookahead in (0, 1, 2, None) and cfg.profile == str(prof.resolve())
    res = _entrain("runs", str(out), "--simulate", "--warmup", "1", "--json")
    row = json.loads(res.stdout)[0]
    assert row["measured_iter_time"] > 0 and row["simulated_iter_time"] > 0
    assert row["simulation_error"] == pytest.approx(
        (row["simulated_iter_time"] - row["measured_iter_time"]) / row["measured_iter_time"]
    )


def _frozen_vision_spec(tmp_path: Path) -> str:
    text = Path(TINY_VISION).read_text().replace("frozen: false", "frozen: true")
    text = text.replace("name: tiny-vision", "name: tiny-frozen-vision")
    path = tmp_path / "frozen.yaml"
    path.write_text(text)
    return str(path)


def test_profile_of_a_frozen_encoder_times_its_projector_on_the_llm_side(demo, tmp_path):
    from entrain.runtime.device import place
    from entrain.runtime.profile import ProfileConfig, fit_profile, measure

    spec = load_spec(_frozen_vision_spec(tmp_path))
    cfg = ProfileConfig(runs=5, warmup=1, max_samples=3)
    m = measure(cfg, spec, read_manifest(demo))
    assert set(m["modules"]["vision"]) == {"forward"}  # no backward: the tower is frozen
    assert set(m["llm_projectors"]["vision"]) == {"forward", "backward"}
    assert m["step"]["vision"] == 0.0
    prof = fit_profile(spec, [m], None, 1, place("cpu"))
    model = prof.cost_model()
    assert model["vision"].backward(np.array([100.0])).sum() == 0
    assert model.llm_projectors["vision"].forward(np.array([100.0])).sum() > 0


def test_analyze_with_a_profile_balances_measured_seconds(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    write_manifest(manifest, generate_workload("llava-instruct", 64, seed=2))
    prof = tmp_path / "p.json"
    _profile().save(prof)
    base = ["analyze", str(manifest), "--model", TINY_VISION, "--dp", "1", "--microbatches"]
    base += ["4", "--global-batch", "32", "--json"]
    assert main(base) == 0
    flops = json.loads(capsys.readouterr().out)
    assert main([*base, "--profile", str(prof)]) == 0
    secs = json.loads(capsys.readouterr().out)
    assert (flops["cost_unit"], secs["cost_unit"]) == ("flop", "s")
    # the per-run constants of the profile change what balanced means: other cvs
    assert secs["policies"]["entrain"]["cv"] != flops["policies"]["entrain"]["cv"]
    assert main([*base[:3], "tiny", *base[4:], "--profile", str(prof)]) == 2
    assert "profiled model" in capsys.readouterr().err


def test_replay_leaves_out_the_samples_the_run_skipped(tmp_path):
    """A run with --skip-bad trained on the manifest less its bad samples; its replay must
    draw its batches from the same reduced data."""
    run, profile = _run_dir(tmp_path)
    w = read_manifest(tmp_path / "m.jsonl")
    gone = w.ids[3]
    (run / "skipped.jsonl").write_text(json.dumps({"id": gone, "line": 4, "reason": "x"}) + "\n")
    rep = replay_run(run)
    spec, prof = load_spec(TINY_VISION), load_profile(profile)
    kept = w.take(np.array([i for i in range(len(w)) if i != 3]))
    plan = ParallelPlan(dp=1, llm_pp=1, microbatches=4, encoder_tp={"vision": 1})
    for s in rep.steps:
        take = batch_indices(len(kept), s.step, 16, 0, True)
        b = cost_batch(kept.take(take), spec, prof.cost_model())
        want = simulate(b, assign("entrain", b, 1, 4, 1, None), spec, plan, prof.hardware())
        assert s.simulated == pytest.approx(want.iter_time)

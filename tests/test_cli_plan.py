"""`entrain plan` and `entrain simulate`, run in-process."""

from __future__ import annotations

import json

import pytest
from cli_helpers import ALL_POLICIES, run_ok, run_user_error

from entrain.cli import main

COMMON = [
    "--model",
    "omni-7b",
    "--gpus",
    "16",
    "--global-batch",
    "128",
    "--microbatch-size",
    "4",
    "--iterations",
    "2",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("ENTRAIN_DEBUG", raising=False)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_plan") / "omni.jsonl"
    rc = main(["trace", "generate", "--kind", "omni", "--n", "512", "--seed", "0", "-o", str(path)])
    assert rc == 0
    return path


@pytest.fixture(scope="module")
def plan_file(trace, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_plan") / "plan.json"
    assert main(["plan", str(trace), *COMMON, "-o", str(path)]) == 0
    return path


# -------------------------------------------------------------------------------------- plan


def test_plan_json_file_and_plot(trace, tmp_path, capsys):
    plan_path, png = tmp_path / "plan.json", tmp_path / "plan.png"
    out, _ = run_ok(
        capsys,
        ["plan", str(trace), *COMMON, "--json", "-o", str(plan_path), "--plot", str(png)],
    )
    result = json.loads(out)
    assert 0 < result["static_over_oracle"] <= 1 + 1e-9
    assert result["gpus"] == 16 and result["global_batch"] == 128
    assert result["model"] == "omni-7b" and result["policy"] == "entrain"
    assert len(result["per_batch"]) == 2
    for row in result["per_batch"]:
        assert row["samples"] == 128
        assert 0 < row["oracle_iter_time"] <= row["static_iter_time"]
    assert result["throughput"]["samples_per_s"] > 0

    written = json.loads(plan_path.read_text())
    assert "plan" in written
    assert written == result
    assert written["plan"]["encoder_tp"].keys() == {"vision", "audio"}
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 1000


def test_plan_table(trace, capsys):
    out, _ = run_ok(capsys, ["plan", str(trace), *COMMON])
    assert "static plan" in out and "static/oracle" in out and "(16 GPUs)" in out


# ----------------------------------------------------------------------------- plan --compare


@pytest.fixture(scope="module")
def compared(trace):
    """`plan --compare --json` on the small trace: (its JSON, its stderr)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["plan", str(trace), *COMMON, "--compare", "--json"]) == 0
    return json.loads(out.getvalue()), err.getvalue()


def test_compare_gives_every_policy_its_plan_and_the_best_baseline(compared):
    result, err = compared
    pol = result["policies"]
    assert list(pol) == ALL_POLICIES
    assert result["gpus"] == 16 and result["global_batch"] == 128 and result["iterations"] == 2
    for name, m in pol.items():
        assert m["plan"]["encoder_tp"].keys() == {"vision", "audio"}, name
        assert m["plan_description"].endswith("(16 GPUs)"), name
        assert m["throughput"]["samples_per_s"] == pytest.approx(128 / m["iter_time"]), name
        assert 0 < m["static_over_oracle"] <= 1 + 1e-9, name
    speed = {p: m["throughput"]["samples_per_s"] for p, m in pol.items()}
    baselines = {p: v for p, v in speed.items() if p != "entrain"}
    assert result["best_baseline"] == max(baselines, key=baselines.get)
    best = speed[result["best_baseline"]]
    assert result["entrain_over_best_baseline"] == pytest.approx(speed["entrain"] / best)
    assert pol["entrain"]["speedup"]["sequential"] == pytest.approx(
        speed["entrain"] / speed["sequential"]
    )
    # each search said up front, once per policy, and counted on one bar
    said = [x for x in err.splitlines() if x.startswith("planning ")]
    assert [x.split(":")[0] for x in said] == [f"planning {p}" for p in ALL_POLICIES]


@pytest.mark.parametrize("policy", ["joint", "entrain"])
def test_compare_plans_each_policy_as_plan_policy_does(trace, compared, capsys, policy):
    """The plan --compare gives a policy is the one `plan --policy P` picks for it alone, at
    the same throughput: not a plan chosen for another policy."""
    out, _ = run_ok(capsys, ["plan", str(trace), *COMMON, "--policy", policy, "--json"])
    alone = json.loads(out)
    mine = compared[0]["policies"][policy]
    assert mine["plan"] == alone["plan"]
    assert mine["throughput"]["samples_per_s"] == pytest.approx(
        alone["throughput"]["samples_per_s"]
    )
    # and the train flags it prints run that policy (Entrain's knobs only for Entrain)
    flags = alone["train_flags"]
    if policy == "entrain":
        assert "--policy" not in flags and "--lookahead" in flags
    else:
        assert f"--policy {policy}" in flags and "--lookahead" not in flags


def test_compare_plans_differ_where_policies_differ(compared):
    """Only entrain's plans carry its knobs (deferral depth, pool): the baselines were
    planned with their own policy, not handed entrain's plan."""
    pol = compared[0]["policies"]
    for name in ALL_POLICIES[:-1]:
        assert "ahead=" not in pol[name]["plan_description"], name


def test_compare_table_has_a_row_per_policy(trace, compared, capsys):
    out, _ = run_ok(capsys, ["plan", str(trace), *COMMON, "--compare"])
    result = compared[0]
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if "│" in line}
    assert set(rows) == set(ALL_POLICIES)
    for name, m in result["policies"].items():
        assert f" {m['plan_description']} " in rows[name], name
        assert f" {m['throughput']['samples_per_s']:,.1f} " in rows[name], name
    gain = result["entrain_over_best_baseline"]
    assert (
        f"entrain vs best baseline ({result['best_baseline']}, at its own plan): {gain:.3f}x" in out
    )


def test_compare_refuses_what_it_cannot_honour(trace, tmp_path, capsys):
    """--compare with one --policy, or a plan file to write, is refused, not half done."""
    with pytest.raises(SystemExit) as e:
        main(["plan", str(trace), *COMMON, "--compare", "--policy", "joint"])
    assert e.value.code == 2
    assert "--policy: not allowed with argument --compare" in capsys.readouterr().err
    plan_path = tmp_path / "plan.json"
    line = run_user_error(capsys, ["plan", str(trace), *COMMON, "--compare", "-o", str(plan_path)])
    assert "--compare writes no plan file" in line and "--policy P -o FILE" in line
    assert not plan_path.exists()


# ---------------------------------------------------------------------------------- simulate


def test_simulate_json_with_plan_and_trace(trace, plan_file, tmp_path, capsys):
    chrome = tmp_path / "trace.json"
    out, _ = run_ok(
        capsys,
        [
            "simulate",
            str(trace),
            *COMMON,
            "--plan",
            str(plan_file),
            "--json",
            "--trace",
            str(chrome),
        ],
    )
    result = json.loads(out)
    planned = json.loads(plan_file.read_text())["plan"]
    assert result["plan"] == planned
    assert result["iterations"] == 2
    pol = result["policies"]
    assert list(pol) == ALL_POLICIES
    for name, m in pol.items():
        assert m["iter_time"] > 0, name
        assert m["throughput"]["samples_per_s"] > 0
        assert m["throughput"]["tokens_per_s"] > m["throughput"]["samples_per_s"]
        assert m["throughput"]["samples_per_s"] == pytest.approx(128 / m["iter_time"])
        assert 0 <= m["bubble_fraction"] < 1
        assert set(m["speedup"]) == set(ALL_POLICIES) - {name}
        for other, s in m["speedup"].items():
            ratio = m["throughput"]["samples_per_s"] / pol[other]["throughput"]["samples_per_s"]
            assert s == pytest.approx(ratio)
        if name != "entrain":
            assert m["peak_deferred_tokens"] == 0, name

    data = json.loads(chrome.read_text())
    slices = [e for e in data["traceEvents"] if e.get("ph") == "X"]
    assert slices
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in slices)
    assert max(e["ts"] + e["dur"] for e in slices) <= pol["entrain"]["iter_time"] * 2e6


def test_simulate_matches_plan_throughput(trace, plan_file, capsys):
    """simulate on the planned plan reproduces the planner's static throughput."""
    out, _ = run_ok(capsys, ["simulate", str(trace), *COMMON, "--plan", str(plan_file), "--json"])
    planned = json.loads(plan_file.read_text())
    got = json.loads(out)["policies"]["entrain"]["throughput"]["samples_per_s"]
    assert got == pytest.approx(planned["throughput"]["samples_per_s"])


def test_simulate_without_plan_plans_now(trace, capsys):
    out, _ = run_ok(
        capsys, ["simulate", str(trace), *COMMON, "--json", "--policies", "joint", "entrain"]
    )
    result = json.loads(out)
    assert list(result["policies"]) == ["joint", "entrain"]
    assert "(16 GPUs)" in result["plan_description"]


def test_simulate_table_lists_every_policy(trace, plan_file, capsys):
    out, _ = run_ok(capsys, ["simulate", str(trace), *COMMON, "--plan", str(plan_file)])
    for name in ALL_POLICIES:
        assert name in out
    assert "vs sequential" in out
    assert out.splitlines()[-1] == (
        "note: every policy ran on this one plan (chosen for entrain); `entrain plan "
        "--compare` gives each policy its own best plan"
    )


def test_simulate_says_the_plan_is_shared_and_whose_it_is(trace, tmp_path, capsys):
    """A plan written by `plan --policy joint` is joint's: simulate says so, as it says
    entrain's when it plans now; a bare plan object names no policy."""
    joint = tmp_path / "joint.json"
    run_ok(capsys, ["plan", str(trace), *COMMON, "--policy", "joint", "-o", str(joint)])
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(json.loads(joint.read_text())["plan"]))
    for flags, chosen_for in (
        (["--plan", str(joint)], "joint"),
        (["--plan", str(bare)], None),
        ([], "entrain"),
    ):
        argv = ["simulate", str(trace), *COMMON, *flags, "--json", "--policies", "joint"]
        out, _ = run_ok(capsys, argv)
        result = json.loads(out)
        assert result["shared_plan"] is True
        assert result["plan_chosen_for"] == chosen_for, flags


# ------------------------------------------------------------------------------------ errors


def test_simulate_plan_for_other_gpu_count(trace, plan_file, capsys):
    argv = ["simulate", str(trace), *COMMON, "--plan", str(plan_file)]
    argv[argv.index("--gpus") + 1] = "8"
    line = run_user_error(capsys, argv)
    assert "16" in line and "8" in line


def test_simulate_plan_not_json(trace, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{this is not json")
    line = run_user_error(capsys, ["simulate", str(trace), *COMMON, "--plan", str(bad)])
    assert "JSON" in line and "bad.json" in line


def test_simulate_plan_unknown_key(trace, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"plan": {"dp": 1, "gpus_per_stage": 3}}))
    line = run_user_error(capsys, ["simulate", str(trace), *COMMON, "--plan", str(bad)])
    assert "gpus_per_stage" in line


def test_simulate_plan_missing_file(trace, tmp_path, capsys):
    run_user_error(capsys, ["simulate", str(trace), *COMMON, "--plan", str(tmp_path / "nope.json")])


@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_unknown_hardware(trace, capsys, command):
    line = run_user_error(capsys, [command, str(trace), *COMMON, "--hardware", "tpu-v9"])
    assert "tpu-v9" in line and "h100" in line


@pytest.mark.parametrize(
    "plan",
    [{"plan": {}}, {"plan": {"dp": 2, "encoder_tp": 5}}],
    ids=["missing-dp", "encoder_tp-not-a-dict"],
)
def test_simulate_malformed_plan_is_a_user_error(trace, tmp_path, capsys, plan):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(plan))
    run_user_error(capsys, ["simulate", str(trace), *COMMON, "--plan", str(bad)])


@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_a_manifest_short_of_one_global_batch_is_refused(trace, tmp_path, capsys, command):
    """32 samples cannot make a global batch of 128 (16 per GPU on 8 GPUs): refused, rather
    than reported as "global batch 128" while 32 samples are simulated."""
    small = tmp_path / "small.jsonl"
    small.write_text("".join(trace.read_text().splitlines(keepends=True)[:32]))
    argv = [command, str(small), "--model", "omni-7b", "--gpus", "8", "--iterations", "1"]
    line = run_user_error(capsys, argv)
    assert line == (
        f"entrain: error: {small}: 32 sample(s), fewer than one global batch of 128 (16 per "
        "GPU, the default); pass --global-batch 32 or less"
    )
    line = run_user_error(capsys, [*argv, "--global-batch", "40"])
    assert line.endswith("32 sample(s), fewer than one global batch of 40; pass --global-batch "
                         "32 or less")  # fmt: skip
    out, _ = run_ok(capsys, [*argv, "--global-batch", "32", "--json"])
    assert json.loads(out)["global_batch"] == 32


@pytest.mark.parametrize("command", ["plan", "simulate"])
def test_the_search_size_is_said_up_front(trace, capsys, command):
    out, err = run_ok(capsys, [command, str(trace), *COMMON, "--json"])
    said = [x for x in err.splitlines() if x.startswith("planning: ")]
    assert len(said) == 1, err
    if command == "plan":
        r = json.loads(out)
        n = len(r["simulated_plans"])
        assert said[0] == (
            f"planning: {said[0].split()[1]} layouts use the GPUs, {r['feasible_plans']} fit "
            f"in memory; simulating {n} on 2 batch(es) of 128 samples ({2 * n} simulations)"
        )
        assert r["search_narrowed"] is None


def test_a_search_too_long_is_narrowed_and_says_so(trace, capsys, monkeypatch):
    """As if each simulation took minutes (a cluster of 100000 GPUs): the plan comes from
    the best-ranked plans only, and one stderr line says what was left out."""
    import entrain.plan.planner as planner

    monkeypatch.setattr(planner, "SIM_S_PER_STAGE_MICROBATCH", 1.0)
    out, err = run_ok(capsys, ["plan", str(trace), *COMMON, "--json"])
    r = json.loads(out)
    notes = [x for x in err.splitlines() if x.startswith("note: --gpus 16: the whole search (")]
    assert len(notes) == 1 and r["search_narrowed"] == notes[0].removeprefix("note: ")
    assert "narrowed to the 1 best-ranked plan(s)" in notes[0]
    [only] = r["simulated_plans"]
    assert r["plan_description"] == only["plan"]

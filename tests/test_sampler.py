"""EntrainBatchSampler (data/sampler.py): each rank's microbatches are the policy's
assignment of the runtime's data order, the ranks together cover every full global batch
once, decoupled units are complete and never late, and bad arguments are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from entrain.cost.batch import cost_batch
from entrain.cost.fit import FitResult
from entrain.cost.flops import CostCoeffs
from entrain.cost.profile import Profile, ProfileError, load_profile
from entrain.data import EntrainBatchSampler, IterationAssignment
from entrain.models.load import load_spec
from entrain.schedule import assign
from entrain.workload.columnar import batch_indices
from entrain.workload.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[1]
N, GLOBAL_BATCH = 50, 12  # 4 full batches an epoch, 2 samples left over
SPEC = load_spec("tiny")


def _records(n: int, seed: int = 0) -> list[dict]:
    """Samples with 0-2 images, some videos (several frame-group units) and some audio
    (several 10 s chunks), so units, items and chunks all vary."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        rec: dict = {"id": f"s{i}", "text_tokens": int(rng.integers(5, 400))}
        if k := int(rng.integers(0, 3)):
            rec["image"] = [
                [int(rng.integers(30, 400)), int(rng.integers(30, 400))] for _ in range(k)
            ]
        if rng.random() < 0.25:
            rec["video"] = [[int(rng.integers(1, 9)), 100, 120]]
        if rng.random() < 0.3:
            rec["audio"] = [
                round(float(rng.uniform(1, 35)), 2) for _ in range(int(rng.integers(1, 3)))
            ]
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sampler") / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(N)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def workload(manifest):
    return read_manifest(manifest)


def _samplers(workload, dp: int, **kw) -> list[EntrainBatchSampler]:
    kw.setdefault("microbatches", 2)
    return [
        EntrainBatchSampler(
            workload, SPEC, global_batch=GLOBAL_BATCH, dp_rank=r, dp_size=dp, **kw
        )
        for r in range(dp)
    ]  # fmt: skip


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_one_epoch_covers_every_full_batch_sample_once(workload, dp):
    samplers = _samplers(workload, dp)
    seen = Counter(i for s in samplers for mb in s for i in mb)
    iters = N // GLOBAL_BATCH
    full = np.concatenate([batch_indices(N, i, GLOBAL_BATCH, 0, True) for i in range(iters)])
    assert sorted(seen) == sorted(full.tolist())
    assert set(seen.values()) == {1}
    assert len(seen) == iters * GLOBAL_BATCH < N  # the tail is dropped, as the runtime does


@pytest.mark.parametrize("policy", ["entrain", "sequential"])
@pytest.mark.parametrize("dp", [1, 2, 3])
def test_each_rank_gets_what_assign_gives_it(workload, dp, policy):
    M = 2
    samplers = _samplers(workload, dp, microbatches=M, policy=policy, epoch=1)
    iters = N // GLOBAL_BATCH
    per_rank = [list(s) for s in samplers]
    for i in range(iters):
        step = iters + i  # epoch 1
        idx = batch_indices(N, step, GLOBAL_BATCH, 0, True)
        asg = assign(policy, cost_batch(workload.take(idx), SPEC), dp, M)
        for r in range(dp):
            want = [
                idx[(asg.sample_replica == r) & (asg.sample_mb == k)].tolist() for k in range(M)
            ]
            assert per_rank[r][i * M : (i + 1) * M] == want


def test_every_rank_instance_computes_the_same_assignment(workload):
    samplers = _samplers(workload, 3, decoupled=True)
    for i in range(samplers[0].iterations):
        for r in range(3):
            views = [s.iteration(i, rank=r) for s in samplers]
            assert all(v == views[r] for v in views)


def test_set_epoch_changes_the_order_and_is_reproducible(workload):
    (s,) = _samplers(workload, 1)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    assert second != first
    assert sorted(i for mb in second for i in mb) == sorted(
        np.concatenate([batch_indices(N, 4 + i, GLOBAL_BATCH, 0, True) for i in range(4)]).tolist()
    )
    s.set_epoch(0)
    assert list(s) == first


def test_no_shuffle_follows_manifest_order(workload):
    (s,) = _samplers(workload, 1, shuffle=False)
    first_batch = sorted(i for mb in list(s)[:2] for i in mb)
    assert first_batch == list(range(GLOBAL_BATCH))


def _expected_units(workload, indices) -> set[tuple]:
    """(encoder, manifest index, modality, item, chunk) of every unit, from the sizes:
    a video has one unit per 2 frames, audio one per started 10 s."""
    out = set()
    for s in indices.tolist():
        for m, t in workload.items.items():
            for j, p in enumerate(np.flatnonzero(t.sample == s)):
                if m == "image":
                    chunks = 1
                elif m == "video":
                    chunks = -(-int(t.size[p, 0]) // 2)
                else:
                    chunks = int(np.ceil(t.size[p, 0] / 10.0))
                enc = "audio" if m == "audio" else "vision"
                out.update((enc, s, m, j, c) for c in range(chunks))
    return out


@pytest.mark.parametrize("dp", [1, 2, 3])
def test_decoupled_units_cover_each_unit_once_and_are_never_late(workload, dp):
    samplers = _samplers(workload, dp, microbatches=2, decoupled=True)
    moved = 0
    for i in range(samplers[0].iterations):
        views: list[IterationAssignment] = [s.iteration(i) for s in samplers]
        llm_at = {
            s: (v.rank, k) for v in views for k, mb in enumerate(v.llm_microbatches) for s in mb
        }
        units = []
        for v in views:
            for enc, mbs in v.encoder_microbatches.items():
                for k, mb in enumerate(mbs):
                    for u in mb:
                        units.append((enc, u.sample, u.modality, u.item, u.chunk))
                        assert (u.llm_rank, u.llm_microbatch) == llm_at[u.sample]
                        assert k <= u.llm_microbatch, "encoded after its sample's LLM microbatch"
                        moved += (v.rank, k) != llm_at[u.sample]
        assert len(units) == len(set(units))
        idx = batch_indices(N, i, GLOBAL_BATCH, 0, True)
        assert set(units) == _expected_units(workload, idx)
    if dp > 1:
        assert moved > 0, "entrain should place some units away from their samples"


def test_decoupled_units_match_the_runtime_plan(workload):
    """The units each rank's encoder gets are those Entrain's runtime would run there."""
    from entrain.program.iteration import IterationPlan

    samplers = _samplers(workload, 2, microbatches=3, decoupled=True)
    for i in range(samplers[0].iterations):
        idx, batch, asg = samplers[0].assignment(i)
        plan = IterationPlan.build(batch, asg, SPEC, 1, workload.take(idx))
        for s in samplers:
            view = s.iteration(i)
            for enc, mbs in view.encoder_microbatches.items():
                for k, mb in enumerate(mbs):
                    refs = [plan.units[enc][u] for u in plan.enc_mb.get((enc, s.dp_rank, k), [])]
                    want = [(int(idx[r.sample]), r.modality, r.item, r.chunk) for r in refs]
                    assert [(u.sample, u.modality, u.item, u.chunk) for u in mb] == want


def test_len_counts_what_one_epoch_yields(workload):
    coupled = _samplers(workload, 2, microbatches=3)[1]
    assert len(coupled) == (N // GLOBAL_BATCH) * 3 == len(list(coupled))
    decoupled = _samplers(workload, 2, microbatches=3, decoupled=True)[1]
    assert len(decoupled) == N // GLOBAL_BATCH == len(list(decoupled))


def test_manifest_path_and_workload_give_the_same_batches(manifest, workload):
    from_path = EntrainBatchSampler(manifest, "tiny", global_batch=GLOBAL_BATCH, microbatches=2)
    assert list(from_path) == list(_samplers(workload, 1)[0])


def test_without_a_process_group_it_is_one_replica(workload):
    s = EntrainBatchSampler(workload, global_batch=GLOBAL_BATCH, microbatches=2)
    assert (s.dp_rank, s.dp_size) == (0, 1)


def _fit(a: float) -> FitResult:
    return FitResult(CostCoeffs(a=a, call=1e-3), rel_rms=0.05, max_rel=0.1, runs=10)


def test_profile_balances_measured_costs(tmp_path, workload):
    # Vision made far dearer than the FLOPs model says: the balance must follow the profile.
    path = tmp_path / "profile.json"
    modules = {
        m: {"forward": _fit(a), "backward": _fit(2 * a)}
        for m, a in [("vision", 1e-3), ("audio", 1e-6), ("llm", 1e-6)]
    }
    Profile(model="tiny", modules=modules, flops=1e10, memory_bytes=1e9).save(path)
    (s,) = _samplers(workload, 1, microbatches=4, profile=path)
    idx = batch_indices(N, 0, GLOBAL_BATCH, 0, True)
    asg = assign(
        "entrain", cost_batch(workload.take(idx), SPEC, load_profile(path).cost_model()), 1, 4
    )
    assert list(s)[:4] == [idx[asg.sample_mb == k].tolist() for k in range(4)]
    assert list(s)[:4] != list(_samplers(workload, 1, microbatches=4)[0])[:4]
    Profile(model="other", modules=modules, flops=1e10, memory_bytes=1e9).save(path)
    with pytest.raises(ProfileError, match="profiled model 'other'"):
        _samplers(workload, 1, profile=path)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(dp_rank=2, dp_size=2), r"dp_rank must be in \[0, dp_size=2\)"),
        (dict(dp_rank=0, dp_size=5), "global_batch 12 is not divisible by dp_size 5"),
        (dict(policy="fastest"), "unknown policy 'fastest'; choose from"),
        (dict(microbatches=0), "microbatches must be an integer >= 1"),
        (dict(dp_size=0, dp_rank=0), "dp_size must be an integer >= 1"),
        (dict(lookahead=-1), "lookahead must be an integer >= 0"),
        (dict(lookahead="auto"), "pass the depth it chose"),
        (dict(pool=0), "pool must be an integer >= 1"),
        (dict(max_deferred_tokens=-5), "max_deferred_tokens must be >= 0"),
        (dict(global_batch=64), "fewer than one global batch"),
    ],
)
def test_bad_arguments_are_clear_value_errors(workload, kw, match):
    args = dict(global_batch=GLOBAL_BATCH, microbatches=2) | kw
    with pytest.raises(ValueError, match=match):
        EntrainBatchSampler(workload, SPEC, **args)


def test_importing_entrain_data_does_not_load_the_runtime():
    code = (
        "import sys, entrain.data; "
        "print(sorted(m for m in sys.modules if m.startswith('entrain.runtime')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_example_trains_with_the_sampler():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_with_sampler.py"), "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    losses = [float(line.split()[3]) for line in out.stdout.splitlines() if " loss " in line]
    assert len(losses) == 2 and all(np.isfinite(losses))

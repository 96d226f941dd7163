"""The planner's memory model held to the runtime: for four layouts of a tiny vision-language
model, the per-rank estimate of plan/memory.py is within 20% of the peak bytes of live tensors
that torch's memory profiler measures on each rank in the real run (`--profile-memory`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from runtime_helpers import train

from entrain.config import read_run_config
from entrain.plan.memory import MemorySettings, encoder_in_flight, plan_memory
from entrain.runtime.demo_data import make_demo_data
from entrain.runtime.setup import make_step, open_dataset, run_layout, source_of

pytestmark = [pytest.mark.timeout(900), pytest.mark.filterwarnings("ignore::UserWarning")]
TINY_VISION = str(Path(__file__).resolve().parents[1] / "benchmarks" / "tiny-vision.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("d"), 24, seed=2, audio_share=0.0)


def estimate(run: Path, precision: str = "fp32") -> dict[str, float]:
    """plan_memory for the run's layout and settings, with its last step's largest
    microbatches, encoder microbatches in flight and deferred embeddings."""
    record = read_run_config(run)
    cfg = record.config
    source = source_of(cfg)
    spec, data = source.spec, open_dataset(cfg, source)
    plan = run_layout(cfg, [e.name for e in spec.encoders], record.world)
    step = make_step(data, cfg, cfg.steps - 1, plan.llm_pp, copies=plan.encoder_dp)
    it, batch = step.plan, step.batch
    tokens = {"llm": max(sum(int(batch.llm_tokens[s]) for s in ss) for ss in it.llm_mb.values())}
    flight = {}
    for e in spec.encoders:
        n = plan.encoder_dp.get(e.name, 1)
        share = max(
            sum(int(batch.units[e.name].tokens[u]) for u in it.copy_units(e.name, r, k, c))
            for (name, r, k) in it.enc_mb if name == e.name for c in range(n)
        )  # fmt: skip
        tokens[e.name] = share * n
        flight[e.name] = max(
            encoder_in_flight(plan.microbatches, plan.llm_pp, None, it.need(e.name, r))
            for r in range(plan.dp)
        )
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    settings = MemorySettings(precision=precision, recompute={"*": False},
                              shard_optimizer=cfg.shard_optimizer)  # fmt: skip
    return plan_memory(spec, plan, tokens, rows[-1]["peak_deferred_tokens"], settings, flight)


LAYOUTS = {
    "one replica": (2, []),
    "two LLM stages": (3, ["--pp", "2", "--microbatches", "3"]),
    "two replicas, ZeRO-1": (4, ["--dp", "2"]),
    "two vision copies": (3, ["--encoder-copies", "vision=2"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_memory_model_is_within_20_percent_of_the_measured_peak(data, tmp_path, layout):
    nproc, flags = LAYOUTS[layout]
    train(data, tmp_path, nproc, "--model", TINY_VISION, "--steps", "2", "--global-batch", "8",
          "--microbatches", "2", *flags, "--profile-memory")  # fmt: skip
    model = estimate(tmp_path)
    measured: dict[str, float] = {}
    for f in tmp_path.glob("memory-*.json"):
        m = json.loads(f.read_text())
        module = "llm" if m["role"].startswith("llm") else m["role"]
        measured[module] = max(measured.get(module, 0), m["peak_bytes"])  # the heaviest rank
    assert set(measured) == set(model) == {"vision", "llm"}
    for module, peak in measured.items():
        assert model[module] == pytest.approx(peak, rel=0.2), (module, model[module], peak)


def test_settings_move_the_estimate_the_way_the_runtime_would():
    from entrain.models import load_spec
    from entrain.schedule.parallel import ParallelPlan

    spec = load_spec("qwen2-vl-7b")
    plan = ParallelPlan(dp=4, llm_pp=4, microbatches=8, encoder_tp={"vision": 1})
    tokens = {"llm": 16384.0, "vision": 16384.0}
    base = MemorySettings(precision="bf16", recompute={"*": True})
    full = plan_memory(spec, plan, tokens, settings=base)
    no_recompute = plan_memory(spec, plan, tokens, settings=dataclasses.replace(base, recompute={}))
    whole = plan_memory(
        spec, plan, tokens, settings=dataclasses.replace(base, shard_optimizer=False)
    )
    assert no_recompute["llm"] > 2 * full["llm"]  # activations dominate without recompute
    assert whole["llm"] > full["llm"] and whole["vision"] > full["vision"]
    deeper = plan_memory(spec, plan, tokens, settings=dataclasses.replace(base, lookahead=None))
    assert deeper["vision"] > full["vision"]  # more encoder microbatches in flight

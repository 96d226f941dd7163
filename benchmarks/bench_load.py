"""Per-rank host memory at start-up, loading a Hugging Face checkpoint.

A rank builds the model's skeleton with parameters on the meta device and reads only its own
tensors from the safetensors files. Measured here in a fresh process per role, on a small
Qwen2-VL made with transformers' own classes (8 LLM layers of width 512): the anonymous
memory (RssAnon) the role's modules add, against the bytes of the parameters it holds.
Writes the table to docs/results.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from results import write_section  # noqa: E402

MEASURE = """
import gc, json, sys, torch
from entrain.runtime.source import model_source

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024

source = model_source(sys.argv[1], 0)
source.model
gc.collect(); before = anon()
role = sys.argv[2]
if role == "vision":
    part, named = source.encoder("vision", torch.device("cpu"))
else:
    stage, stages = map(int, role.split("/"))
    part, named = source.llm_stage(stage, stages, torch.device("cpu"))
gc.collect()
print(json.dumps({"grew": anon() - before, "held": sum(p.numel() * 4 for p in named.values())}))
"""


def main() -> int:
    from hf_models import tiny_vl

    with tempfile.TemporaryDirectory() as tmp:
        folder = tiny_vl(Path(tmp) / "m", layers=8, hidden=512)
        vocab = json.loads((folder / "config.json").read_text())["text_config"]["vocab_size"]
        roles = ["0/1", "0/2", "1/2", "0/4", "3/4", "vision"]
        rows = []
        for role in roles:
            out = subprocess.run(
                [sys.executable, "-c", MEASURE, str(folder), role],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            m = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((role, m["held"] / 1e6, m["grew"] / 1e6))
    whole = rows[0][2]
    lines = [
        "| rank holds | parameters (MB, fp32) | memory added (MB, RssAnon) | of the whole LLM |",
        "|---|---:|---:|---:|",
    ]
    for role, held, grew in rows:
        name = "the ViT" if role == "vision" else f"LLM stage {role.replace('/', ' of ')}"
        share = "" if role == "vision" else f"{grew / whole:.2f}"
        lines.append(f"| {name} | {held:.1f} | {grew:.1f} | {share} |")
        print(f"{name:22s} params {held:7.1f} MB  added {grew:7.1f} MB")
    body = (
        f"Qwen2-VL made with transformers (ViT 2 x 32, LLM 8 layers x 512, vocab {vocab}), each "
        "role built in a fresh process by `entrain.runtime.source` from its safetensors "
        "(`benchmarks/bench_load.py`):\n\n" + "\n".join(lines)
    )
    print(f"wrote {write_section('Start-up memory per rank (loading a checkpoint)', body)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

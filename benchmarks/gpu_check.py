"""The checks to run when a GPU machine is lent: one short script, one report.

    python benchmarks/gpu_check.py                # on the GPU machine (--device cuda)
    python benchmarks/gpu_check.py --device cpu   # the same steps on CPU, to try the script

1. Gradient equivalence on the device: one training step of the tiny model on 3 processes
   (vision, audio, LLM) per policy, parameters compared with the single-process CPU
   reference. TF32 is switched off (NVIDIA_TF32_OVERRIDE=0) so the GPU computes in fp32;
   the tolerance is still looser than on CPU (other kernels sum in other orders).
2. Throughput of sequential, llm-balanced and entrain through the same runtime, side by
   side: medians of the steps after the first epoch (the first decodes every file).
3. A profile of the modules on the device (`entrain profile --device`).
4. A pretrained Hugging Face folder (a tiny Qwen2-VL made with transformers) loaded
   straight to each rank's GPU, trained one step as ViT + 2 LLM stages, its parameters
   compared with the CPU reference and its loss with the transformers model's.
5. bf16 and the memory model on the device: the tiny vision model trained with
   --precision bf16 --profile-memory, each rank's measured peak (torch's memory profiler on
   the GPU) beside plan/memory.py's estimate for the same layout and settings.

With fewer GPUs than processes the ranks share GPUs and send through host memory over
gloo (runtime/device.py); NCCL's path needs a GPU per process. The report says which ran.
Not part of `make bench`: it is for a machine this one is not.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from entrain.runtime.demo_data import make_demo_data
from entrain.runtime.device import place
from entrain.runtime.reference import reference_params
from entrain.runtime.setup import TrainConfig

NPROC = 3


def entrain(*args: str, env: dict) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, "-m", "entrain", *args], capture_output=True, text=True, env=env
    )
    if res.returncode:
        print(res.stdout[-2000:], res.stderr[-4000:], sep="\n")
        raise SystemExit(f"failed: entrain {' '.join(args)}")
    return res


def train(data: Path, out: Path, policy: str, device: str, env: dict, *flags: str) -> None:
    """`entrain train` on NPROC processes of the device."""
    where = ["--data", str(data), "--out", str(out), "--device", device, "--nproc", str(NPROC)]
    entrain("train", "--policy", policy, *where, *flags, env=env)


def equivalence(data: Path, work: Path, device: str, env: dict) -> bool:
    ok = True
    for policy in ("entrain", "sequential"):
        out = work / f"eq-{policy}"
        flags = ["--steps", "1", "--global-batch", "10", "--microbatches", "3"]
        train(data, out, policy, device, env, "--save-params", *flags)
        cfg = TrainConfig(data=str(data), policy=policy, steps=1, global_batch=10, microbatches=3)
        ref = reference_params(cfg)
        got: dict[str, torch.Tensor] = {}
        for f in glob.glob(str(out / "params-*.pt")):
            got.update(torch.load(f))
        worst = max(float((got[n] - p).abs().max()) for n, p in ref.items())
        close = all(torch.allclose(got[n], p, rtol=1e-3, atol=1e-4) for n, p in ref.items())
        moved = max(
            float((p - q).abs().max())
            for p, q in zip(ref.values(), reference_params(cfg, steps=0).values())
        )
        print(
            f"  {policy:12s} params vs CPU reference: max |diff| {worst:.2e} "
            f"(a step moved weights by up to {moved:.2e}) -> {'ok' if close else 'DIFFERENT'}"
        )
        ok &= close and set(got) == set(ref)
    return ok


def throughput(data: Path, work: Path, device: str, env: dict, steps: int) -> dict[str, float]:
    times = {}
    for policy in ("sequential", "llm-balanced", "entrain"):
        out = work / f"tp-{policy}"
        flags = ["--steps", str(steps), "--global-batch", "32", "--microbatches", "8"]
        train(data, out, policy, device, env, *flags)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        times[policy] = statistics.median(r["iter_time"] for r in rows[4:])  # epoch 1 = 4 steps
        print(f"  {policy:12s} {times[policy]:.4f} s/step (median of steps 5-{steps})")
    for base in ("sequential", "llm-balanced"):
        print(f"  entrain / {base}: {times[base] / times['entrain']:.3f}")
    return times


def pretrained(work: Path, device: str, env: dict) -> bool:
    """A model folder on the device: loss vs transformers, parameters vs the CPU reference."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from hf_models import tiny_vl, transformers_loss
    from transformers import Qwen2VLForConditionalGeneration

    from entrain.data.codec import HFCodec
    from entrain.models.hf import hf_model

    folder = tiny_vl(work / "Qwen2-VL-tiny")
    data = make_demo_data(
        work / "hf-data", 16, seed=2, audio_share=0.0, codec=HFCodec(folder, hf_model(folder))
    )
    out = work / "hf-run"
    flags = ["--steps", "1", "--global-batch", "8", "--microbatches", "2", "--save-params"]
    train(data, out, "entrain", device, env, "--model", str(folder), "--pp", "2", *flags)
    cfg = TrainConfig(data=str(data), model=str(folder), steps=1, global_batch=8, microbatches=2)
    ref = reference_params(cfg)
    got: dict[str, torch.Tensor] = {}
    for f in glob.glob(str(out / "params-*.pt")):
        got.update(torch.load(f))
    worst = max(float((got[n] - p).abs().max()) for n, p in ref.items())
    close = set(got) == set(ref) and all(
        torch.allclose(got[n], p, rtol=1e-3, atol=1e-4) for n, p in ref.items()
    )
    loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    want = transformers_loss(Qwen2VLForConditionalGeneration, folder, cfg)
    print(
        f"  loss {loss:.6f} vs transformers {want:.6f}; params vs CPU reference: max |diff| "
        f"{worst:.2e} -> {'ok' if close else 'DIFFERENT'}"
    )
    return close and abs(loss - want) <= 1e-3 * abs(want)


def memory(work: Path, device: str, env: dict) -> bool:
    """Measured peak per rank against the memory model, bf16 on the device."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_memory import TINY_VISION, estimate

    data = make_demo_data(work / "mem-data", 24, seed=2, audio_share=0.0)
    out = work / "mem-run"
    entrain("train", "--data", str(data), "--out", str(out), "--device", device, "--nproc", "2",
            "--model", TINY_VISION, "--steps", "2", "--global-batch", "8", "--microbatches",
            "2", "--precision", "bf16", "--profile-memory", env=env)  # fmt: skip
    model = estimate(out, precision="bf16")
    ok = True
    for f in sorted(out.glob("memory-*.json")):
        m = json.loads(f.read_text())
        module = "llm" if m["role"].startswith("llm") else m["role"]
        ratio = model[module] / m["peak_bytes"]
        ok &= 0.8 <= ratio <= 1.2
        print(f"  {m['role']:8s} measured {m['peak_bytes'] / 1e6:8.2f} MB ({m['device']}), "
              f"model {model[module] / 1e6:8.2f} MB: {ratio:.2f}")  # fmt: skip
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--steps", type=int, default=16, help="steps per throughput run")
    ap.add_argument("--out", default=None, help="keep the runs here (default: a temp dir)")
    args = ap.parse_args()
    env = dict(os.environ, NVIDIA_TF32_OVERRIDE="0", OMP_NUM_THREADS="1")
    where = place(args.device, 0, NPROC)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(
        f"torch {torch.__version__}, GPUs: {torch.cuda.device_count()} ({gpu}); "
        f"{NPROC} ranks on {where.device.type}, messages over {where.backend}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        data = make_demo_data(work / "data", 128, seed=0)
        t0 = time.perf_counter()
        print("1. gradient equivalence (1 step, 3 ranks)")
        ok = equivalence(data, work, args.device, env)
        print(f"2. throughput (global batch 32, 8 microbatches, {args.steps} steps)")
        throughput(data, work, args.device, env, args.steps)
        print("3. profile of the modules on the device")
        res = entrain(
            "profile",
            "--data",
            str(data),
            "--device",
            args.device,
            "--nproc",
            "1",
            "--runs",
            "20",
            "-o",
            str(work / "profile.json"),
            env=env,
        )
        print("\n".join("  " + x for x in res.stdout.strip().splitlines()[-16:]))
        print("4. a pretrained Hugging Face folder on the device (ViT + 2 LLM stages)")
        ok &= pretrained(work, args.device, env)
        print("5. bf16 memory on the device against the memory model")
        memory(work, args.device, env)  # reported, not required: the model is fit on CPU
        print(f"done in {time.perf_counter() - t0:.0f} s; equivalence {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Figures (matplotlib, headless)."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plan_figure(result: dict, ratios: dict[int, dict[str, float]], path: str | os.PathLike) -> None:
    """Left: throughput of the static plan and of the per-batch best plan (the oracle) on
    each sampled global batch. Right: cv of per-batch encoder/LLM work ratios against global
    batch size, with the 1/sqrt(N) trend."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    per = result["per_batch"]
    x = list(range(len(per)))
    a.plot(x, [p["samples"] / p["static_iter_time"] for p in per], "o-", label="static plan")
    a.plot(
        x,
        [p["samples"] / p["oracle_iter_time"] for p in per],
        "s--",
        label="dynamic oracle (best plan per batch)",
    )
    a.set_xlabel("global batch")
    a.set_ylabel("simulated samples/s")
    a.set_title(f"static / oracle = {result['static_over_oracle']:.3f}")
    a.legend()
    a.grid(alpha=0.3)
    sizes = sorted(ratios)
    for enc in next(iter(ratios.values())) if ratios else {}:
        ys = [ratios[n][enc] for n in sizes]
        b.loglog(sizes, ys, "o-", label=f"{enc} / llm")
        if ys and ys[0] > 0:
            b.loglog(sizes, [ys[0] * (sizes[0] / n) ** 0.5 for n in sizes], ":", color="gray")
    b.set_xlabel("global batch size (samples)")
    b.set_ylabel("cv of per-batch work ratio")
    b.set_title("macro work ratios concentrate (dotted: 1/sqrt(N))")
    if b.get_legend_handles_labels()[0]:
        b.legend()
    b.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

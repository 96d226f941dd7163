"""`entrain report`: one self-contained HTML page (figures inlined as PNG, no scripts, no
network) from what Entrain writes: an analysis (`entrain analyze --json`) or a training run
directory (`entrain train --out DIR`). Torch-free; matplotlib draws headless.

From an analysis: the work each microbatch gets, per module, under every policy (the
picture that shows the problem: a microbatch heavy for one module and light for another),
and the spread (cv) per policy. From a run: loss and throughput over steps, the pipeline
timeline of the traced step as it ran, and, when the run trained with a profile, the
simulator's replay of every step next to the measurement and its timeline of the same step.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

from entrain.config import read_run_config
from entrain.runlog import read_metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"llm": "#4c72b0", "vision": "#dd8452", "audio": "#55a868"}


@dataclass
class Section:
    title: str
    text: str = ""
    figures: list[bytes] = field(default_factory=list)
    """PNG bytes."""
    table: list[list[str]] | None = None
    """Rows, the first is the header."""


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _color(module: str, i: int) -> str:
    return COLORS.get(module, f"C{i + 3}")


# --------------------------------------------------------------------------------- analysis


def work_figure(first: dict[str, dict[str, list[float]]]) -> bytes:
    """One panel per policy: each microbatch's work per module, as a share of that module's
    mean (1.0 = perfectly even)."""
    policies = list(first)
    cols = min(3, len(policies))
    rows = -(-len(policies) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, p in zip(axes.flat, policies):
        modules = list(first[p])
        n = len(first[p][modules[0]])
        width = 0.8 / len(modules)
        for i, m in enumerate(modules):
            w = first[p][m]
            mean = sum(w) / len(w) if w and sum(w) > 0 else 1.0
            xs = [j + (i - (len(modules) - 1) / 2) * width for j in range(n)]
            ax.bar(xs, [x / mean for x in w], width, label=m, color=_color(m, i))
        ax.axhline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_xticks(range(0, n, max(1, n // 16)))
        ax.set_title(p)
        ax.set_xlabel("microbatch (replica-major)")
        ax.set_ylabel("work / mean")
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(policies) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("work of each microbatch per module, first global batch")
    fig.tight_layout()
    return _png(fig)


def cv_figure(policies: dict[str, dict]) -> bytes:
    names = list(policies)
    modules = list(next(iter(policies.values()))["cv"])
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(modules)
    for i, m in enumerate(modules):
        xs = [j + (i - (len(modules) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [policies[p]["cv"][m] for p in names], width, label=m, color=_color(m, i))
    ax.set_xticks(range(len(names)), names, rotation=15)
    ax.set_ylabel("cv of per-microbatch work")
    ax.set_title("spread of microbatch work per policy (lower is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return _png(fig)


def analysis_sections(data: dict) -> list[Section]:
    cfg = data.get("config", {})
    intro = (
        f"model {data['model']}, {cfg.get('dp')} replica(s) x {cfg.get('microbatches')} "
        f"microbatches, global batch {cfg.get('global_batch')}, {data['iterations']} "
        f"global batch(es), {data['samples']} samples"
    )
    table = [["policy", "worst cv", *(f"cv {m}" for m in data["modules"]), "stretch"]]
    for p, m in data["policies"].items():
        table.append(
            [p, f"{m['worst_cv']:.4f}", *(f"{m['cv'][x]:.4f}" for x in data["modules"]),
             f"{m['stretch']:.4f}"]
        )  # fmt: skip
    out = []
    if data.get("first_batch_work"):
        out.append(
            Section(
                "Work per microbatch",
                "Each bar is one microbatch's work for one module, as a share of the module's "
                "mean. Where one module's bar is tall and another's short, the pipeline waits.",
                [work_figure(data["first_batch_work"])],
            )
        )
    out.append(Section("Spread per policy", intro, [cv_figure(data["policies"])], table))
    return out


# -------------------------------------------------------------------------------------- run


def steps_figure(rows: list[dict], replay: list[float] | None) -> bytes:
    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.6))
    a.plot(steps, [r["loss"] for r in rows], "o-")
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.set_title("loss")
    a.grid(alpha=0.3)
    b.plot(steps, [r["iter_time"] for r in rows], "o-", label="measured")
    if replay:
        b.plot(steps, replay, "s--", label="simulated (replay with the profile)")
    b.set_xlabel("step")
    b.set_ylabel("seconds per step")
    b.set_title("iteration time")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def timeline_figure(panels: list[tuple[str, list[tuple[str, str, float, float]]]]) -> bytes:
    """Gantt charts of (device, action, start s, end s): forwards dark, backwards light."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 1.2 + 0.5 * 6 * len(panels)),
                             squeeze=False)  # fmt: skip
    for ax, (title, events) in zip(axes.flat, panels):
        devices = sorted({d for d, *_ in events}, key=lambda d: (d.split("/r")[-1], d))
        for y, dev in enumerate(devices):
            module = dev.split("/")[0].split(".")[0]
            for d, action, start, end in events:
                if d == dev:
                    fwd = action.startswith("F")
                    ax.barh(y, end - start, left=start, height=0.7,
                            color=_color(module, y), alpha=1.0 if fwd else 0.45,
                            edgecolor="white", linewidth=0.5)  # fmt: skip
                    if end - start > 0.03 * max(e for *_, e in events):
                        ax.text((start + end) / 2, y, action, ha="center", va="center", fontsize=7)
        ax.set_yticks(range(len(devices)), devices)
        ax.invert_yaxis()
        ax.set_xlabel("seconds into the step")
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return _png(fig)


def _trace_events(path: Path) -> list[tuple[str, str, float, float]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return [
        (e["args"]["device"], e["name"], e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6)
        for e in data.get("traceEvents", [])
        if e.get("ph") == "X"
    ]


def run_sections(run_dir: Path, notes: list[str] | None = None) -> list[Section]:
    """The run's steps and timeline; a note on a cut-short last line of metrics.jsonl goes
    to `notes` and onto the page."""
    said: list[str] = []
    rows = read_metrics(run_dir, said)
    if notes is not None:
        notes.extend(said)
    try:  # a report needs only metrics.jsonl; the config adds the run's description
        record = read_run_config(run_dir)
    except ValueError:
        record = None
    cfg = record.config if record else None
    replay = replayer = None
    if cfg is not None and cfg.profile:
        from entrain.sim.replay import RunReplayer

        replayer = RunReplayer(run_dir)
        replay = [replayer.simulate(r["step"]).iter_time for r in rows]
    intro = (
        f"policy {cfg.policy}, model {Path(cfg.model).name}, {record.world} ranks, global "
        f"batch {cfg.global_batch} in {cfg.microbatches} microbatches, {len(rows)} steps"
        if cfg is not None
        else f"{len(rows)} steps (no config.json)"
    ) + "".join(f". Note: {n}" for n in said)
    table = [
        ["step", "loss", "seconds", "samples/s", "tokens/s"] + (["simulated s"] if replay else [])
    ]
    for i, r in enumerate(rows):
        table.append(
            [str(r["step"]), f"{r['loss']:.4f}", f"{r['iter_time']:.4f}",
             f"{r['samples_per_s']:.1f}", f"{r['tokens_per_s']:,.0f}"]
            + ([f"{replay[i]:.4f}"] if replay else [])
        )  # fmt: skip
    out = [Section("Steps", intro, [steps_figure(rows, replay)], table)]
    trace = run_dir / "trace.json"
    if trace.exists():
        panels = [("as it ran (last step, from trace.json)", _trace_events(trace))]
        if replayer is not None:
            events = replayer.simulate(rows[-1]["step"], record_events=True).events
            panels.append(("the simulator's replay of the same step", events))
        out.append(Section("Pipeline timeline", "", [timeline_figure(panels)]))
    return out


# ------------------------------------------------------------------------------------- page

CSS = """body{font-family:system-ui,sans-serif;max-width:1240px;margin:2em auto;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
img{max-width:100%;display:block;margin:1em 0}table{border-collapse:collapse;font-size:.85em}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}td:first-child{text-align:left}
p{line-height:1.5}"""


def render(title: str, sections: list[Section]) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
             f"</title><style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"]  # fmt: skip
    for s in sections:
        parts.append(f"<h2>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        for png in s.figures:
            data = base64.b64encode(png).decode("ascii")
            parts.append(f"<img class='figure' alt='{html.escape(s.title)}' "
                         f"src='data:image/png;base64,{data}'>")  # fmt: skip
        if s.table:
            head, *body = s.table
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head))
            for row in body:
                parts.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def build_report(
    source: str | os.PathLike, notes: list[str] | None = None
) -> tuple[str, list[Section]]:
    """(title, sections) from a run directory or an analysis JSON file; what the reader
    should know about the source (a log line cut short) goes to `notes`."""
    source = Path(source)
    if source.is_dir():
        return f"Entrain run {source.name}", run_sections(source, notes)
    if not source.exists():
        raise ValueError(f"{source}: no such file or directory")
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{source}: not JSON ({e}); expected `entrain analyze --json` output"
        ) from None
    if not isinstance(data, dict) or "policies" not in data or "modules" not in data:
        raise ValueError(f"{source}: not an analysis (expected `entrain analyze --json` output)")
    return f"Entrain analysis of {source.name}", analysis_sections(data)


def write_report(
    source: str | os.PathLike, path: str | os.PathLike, notes: list[str] | None = None
) -> int:
    """Write the page; returns the number of figures in it."""
    title, sections = build_report(source, notes)
    Path(path).write_text(render(title, sections), encoding="utf-8")
    return sum(len(s.figures) for s in sections)

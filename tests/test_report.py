"""`entrain report`: a self-contained HTML page from an analysis or a run directory, and
that it renders with its figures in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from entrain.analyze import AnalyzeConfig, analyze
from entrain.cli import main
from entrain.models.load import load_spec
from entrain.report.html import build_report, write_report
from entrain.report.trace import write_chrome_trace
from entrain.workload.traces import write_trace

FIGURE = re.compile(r"<img class='figure' alt='[^']*' src='data:image/png;base64,([^']+)'>")


def _figures(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in FIGURE.findall(page)]


@pytest.fixture(scope="module")
def analysis(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("an")
    write_trace("omni", 128, 0, d / "m.jsonl")
    cfg = AnalyzeConfig(dp=2, microbatches=4, global_batch=32, iterations=2)
    out = d / "analysis.json"
    out.write_text(json.dumps(analyze(d / "m.jsonl", load_spec("omni-7b"), cfg)))
    return out


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": i, "loss": 6.0 - i, "iter_time": 0.2 + 0.01 * i, "samples_per_s": 80.0,
         "tokens_per_s": 9000.0, "busy": {}, "idle": {}}
        for i in range(5)
    ]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.json").write_text(json.dumps({"policy": "entrain", "model": "tiny", "world": 2}))
    events = [("vision/r0", "F0", 0.0, 0.01), ("llm.s0/r0", "F0", 0.011, 0.02),
              ("llm.s0/r0", "B0", 0.02, 0.04), ("vision/r0", "B0", 0.041, 0.05)]  # fmt: skip
    write_chrome_trace(events, run / "trace.json")
    return run


def test_analysis_report_has_work_and_spread_figures(analysis, tmp_path):
    out = tmp_path / "a.html"
    assert write_report(analysis, out) == 2
    page = out.read_text()
    figs = _figures(page)
    assert len(figs) == 2 and all(f.width > 400 and f.height > 200 for f in figs)
    assert "Work per microbatch" in page and "Spread per policy" in page
    for policy in ("sequential", "llm-balanced", "entrain"):
        assert f"<td>{policy}</td>" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_run_report_has_steps_and_timeline(run_dir, tmp_path):
    out = tmp_path / "r.html"
    assert write_report(run_dir, out) == 2
    page = out.read_text()
    assert "Pipeline timeline" in page and "<td>5.0000</td>" in page
    (run_dir / "trace.json").unlink()
    title, sections = build_report(run_dir)
    assert [s.title for s in sections] == ["Steps"] and "run" in title


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: p / "missing.json", "no such file"),
        (lambda p: (p / "x.json").write_text("{oops") and p / "x.json", "not JSON"),
        (lambda p: (p / "y.json").write_text("[1, 2]") and p / "y.json", "not an analysis"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "no metrics.jsonl"),
    ],
)
def test_bad_sources_are_named(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        build_report(make(tmp_path))


def test_cli_report(analysis, tmp_path, capsys):
    out = tmp_path / "c.html"
    assert main(["report", str(analysis), "-o", str(out)]) == 0
    assert "2 figure(s)" in capsys.readouterr().err and out.exists()
    assert main(["report", str(tmp_path / "nope.json"), "-o", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err


def _chromium() -> str | None:
    return (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )


@pytest.mark.skipif(
    _chromium() is None, reason="no Chromium (apt-get install chromium; .ci/run does)"
)
@pytest.mark.parametrize("kind", ["analysis", "run"])
def test_report_renders_in_headless_chromium(kind, analysis, run_dir, tmp_path):
    page = tmp_path / "page.html"
    write_report(analysis if kind == "analysis" else run_dir, page)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--screenshot={shot}", "--window-size=1300,1800", page.resolve().as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    img = Image.open(shot).convert("RGB")
    assert img.size == (1300, 1800)
    # the figures are drawn: many distinct colours (a page of text alone has a few dozen),
    # including the modules' bar colours
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 500
    present = {c for _, c in colours}
    assert (76, 114, 176) in present  # the LLM's blue (#4c72b0)
    dom = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
         page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert dom.count('class="figure"') == 2

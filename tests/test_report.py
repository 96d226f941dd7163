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
from cli_helpers import run_ok, run_user_error
from PIL import Image

from entrain.analyze import AnalyzeConfig, analyze
from entrain.cli import main
from entrain.models.load import load_spec
from entrain.report.html import build_report, write_report
from entrain.report.trace import write_chrome_trace
from entrain.runtime.logbook import Logbook
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


# ------------------------------------------------------- runs and report on a stopped run


def _logged_run(root: Path, speeds: list[float]) -> Path:
    """A run directory whose logs are written as rank 0 writes them (no config.json: the
    runs table and the report need only metrics.jsonl)."""
    run = root / "run"
    run.mkdir()
    book = Logbook(run, 0)
    for i, speed in enumerate(speeds):
        metrics = {"step": i, "loss": 6.0 - i, "iter_time": 8 / speed, "samples_per_s": speed,
                   "tokens_per_s": 100 * speed, "busy": {"r0": 0.1}}  # fmt: skip
        book.write(i, metrics, [f"s{i}a", f"s{i}b"])
    book.close()
    return run


def _tear_last_line(path: Path) -> None:
    """What a kill in the middle of an append leaves: the last line's first half."""
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: start + (len(data) - start) // 2])


def test_runs_and_report_read_a_run_whose_last_line_is_torn(tmp_path, capsys):
    run = _logged_run(tmp_path, [10.0, 20.0, 30.0, 40.0, 50.0])
    for log in ("metrics.jsonl", "samples.jsonl"):
        _tear_last_line(run / log)
    note = f"{run / 'metrics.jsonl'}: line 5 is cut short (the run stopped while writing it?)"
    out, err = run_ok(capsys, ["runs", str(run), "--warmup", "1", "--json"])
    [row] = json.loads(out)
    assert (row["steps"], row["losses"]) == (4, [6.0, 5.0, 4.0, 3.0])
    assert row["samples_per_s"] == 30.0  # median of steps 1-3, the torn step 4 left out
    assert err.count(note) == 1, err
    page = tmp_path / "r.html"
    _, err = run_ok(capsys, ["report", str(run), "-o", str(page)])
    assert err.count(note) == 1, err
    assert "4 steps (no config.json). Note: " in page.read_text()
    assert "<td>3</td>" in page.read_text() and "<td>4</td>" not in page.read_text()


def test_a_bad_line_before_the_last_is_an_error_naming_file_and_line(tmp_path, capsys):
    run = _logged_run(tmp_path, [10.0, 20.0, 30.0])
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text(lines[0] + lines[1][:20] + "\n" + lines[2])
    want = f"entrain: error: {metrics}: line 2: not valid JSON ("
    assert run_user_error(capsys, ["runs", str(run)]).startswith(want)
    assert run_user_error(capsys, ["report", str(run), "-o", str(tmp_path / "x.html")]).startswith(
        want
    )
    metrics.write_text(lines[0] + '{"step": 1}\n' + lines[2])
    line = run_user_error(capsys, ["runs", str(run)])
    assert line == f"entrain: error: {metrics}: line 2: no 'loss', 'iter_time', " + (
        "'samples_per_s', 'tokens_per_s'"
    )


def test_runs_with_more_warmup_than_steps_says_so(tmp_path, capsys):
    run = _logged_run(tmp_path, [10.0, 30.0])
    out, err = run_ok(capsys, ["runs", str(run), "--warmup", "100"])
    assert "medians after 100 warm-up steps; * over all steps: the run has no more" in out
    assert "2*" in out and "20.0" in out  # the median of both steps
    assert f"{run} has only 2 step(s), not more than --warmup 100" in err
    out, _ = run_ok(capsys, ["runs", str(run), "--warmup", "100", "--json"])
    [row] = json.loads(out)
    assert (row["warmup"], row["samples_per_s"]) == (0, 20.0)
    out, err = run_ok(capsys, ["runs", str(run), "--warmup", "1", "--json"])
    [row] = json.loads(out)
    assert (row["warmup"], row["samples_per_s"], err) == (1, 30.0, "")

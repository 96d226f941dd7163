"""The run's per-step files: metrics.jsonl and, with --tensorboard, event files holding the
same numbers; a resumed run replaces the steps it redoes in both."""

from __future__ import annotations

import json

import pytest
from runtime_helpers import read_scalars

from entrain.runtime.logbook import Logbook, scalars


def test_scalars_flatten_one_level_and_skip_what_is_not_a_number():
    m = {"step": 3, "loss": 2.5, "busy": {"llm.s0/r0": 0.25, "name": "x"}, "policy": "entrain",
         "ok": True, "tokens": 7}  # fmt: skip
    assert scalars(m) == {"loss": 2.5, "busy/llm.s0/r0": 0.25, "tokens": 7.0}


def test_event_files_match_the_json_lines_and_a_resume_replaces_redone_steps(tmp_path):
    book = Logbook(tmp_path, 0, tensorboard=True)
    for step in range(4):
        book.write(step, {"step": step, "loss": 10.0 - step}, [f"s{step}"])
    book.close()
    # resumed from the checkpoint after step 2: steps 2 and 3 are redone with new values
    book = Logbook(tmp_path, 2, tensorboard=True)
    for step in (2, 3):
        book.write(step, {"step": step, "loss": 100.0 + step}, [f"s{step}"])
    book.close()
    board = read_scalars(tmp_path / "tensorboard")
    assert board["loss"] == [(0, 10.0), (1, 9.0), (2, 102.0), (3, 103.0)]
    lines = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [0, 1, 2, 3, 2, 3]  # the runtime trims these itself


def test_without_the_flag_no_event_files(tmp_path):
    book = Logbook(tmp_path, 0)
    book.write(0, {"step": 0, "loss": 1.0}, [])
    book.close()
    assert not (tmp_path / "tensorboard").exists()
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == pytest.approx(1.0)

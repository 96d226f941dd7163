"""Shared helpers for the CLI tests: run `entrain` in-process and check its exit."""

from __future__ import annotations

from entrain.cli import main

# every policy by name, as a user types them (a literal: the CLI must keep these names)
ALL_POLICIES = [
    "sequential",
    "llm-balanced",
    "encoder-balanced",
    "joint",
    "encoder-rebalance",
    "entrain",
]


def run_ok(capsys, argv: list[str]) -> tuple[str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Traceback" not in err
    return out, err


def run_user_error(capsys, argv: list[str]) -> str:
    """Run a command that must fail as a user error; returns its one stderr line."""
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("entrain: error:")
    return lines[0]

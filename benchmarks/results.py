"""docs/results.md: the measured results of `make bench`, one section per benchmark.

Each benchmark writes its own section (a heading and Markdown under it); the page keeps the
other sections as they were and stamps each one with the machine and the commit it was
measured on. Nothing in it is pasted by hand.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path

PAGE = Path(__file__).resolve().parents[1] / "docs" / "results.md"
HEAD = (
    "# Measured results\n\n"
    "Written by `make bench` (benchmarks/); each section says where and on which commit it "
    "was measured. Do not edit by hand: rerun the benchmark.\n"
)


def stamp() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True)
        if dirty.stdout.strip():
            commit += " (uncommitted changes)"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{platform.system()} {cpu}, {os.cpu_count()} cores; commit {commit}; {when}"


def write_section(title: str, body: str) -> Path:
    """Replace (or add) the section `## title` of docs/results.md."""
    text = PAGE.read_text(encoding="utf-8") if PAGE.exists() else HEAD
    section = f"## {title}\n\n_{stamp()}_\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: section + "\n", text)
        if pattern.search(text)
        else (text.rstrip() + "\n\n" + section)
    )
    PAGE.write_text(text.rstrip() + "\n", encoding="utf-8")
    return PAGE


class Section:
    """A benchmark's output: printed as it comes, and kept for its section of the page.
    Text output goes in a fenced block; output that is already Markdown (tables) as is."""

    def __init__(self, title: str, intro: str, markdown: bool = False):
        self.title, self.intro, self.markdown = title, intro.strip(), markdown
        self.lines: list[str] = []

    def print(self, *parts: object) -> None:
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.lines.append(line)

    def save(self) -> Path:
        text = "\n".join(self.lines).strip("\n")
        body = text if self.markdown else f"```text\n{text}\n```"
        page = write_section(self.title, f"{self.intro}\n\n{body}")
        print(f"wrote the section {self.title!r} of {page}")
        return page

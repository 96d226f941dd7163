"""The README is a front page and the docs stay inside the repository.

Project rules checked here: README.md is at most 12 KB; its first code block holds exactly
the two commands a user needs (`make demo`, `make test`); every relative Markdown link in
README.md and docs/*.md points at a file that exists inside the repository; and no page
points at the design notes outside it (../shared), which a clone does not have.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_LIMIT = 12 * 1024

# [text](target) and ![alt](target); an optional "title" after the target is dropped.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~)")
EXTERNAL = ("http://", "https://", "mailto:")


def pages() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text outside fenced code blocks: a `[x](y)` inside code is not a link."""
    keep, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            keep.append(line)
    return "\n".join(keep)


def code_blocks(text: str) -> list[list[str]]:
    """The lines of each fenced code block, in order."""
    blocks, current = [], None
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def relative_links(text: str) -> list[str]:
    """Link targets that name a file in the repository: no URLs, no bare #anchors, and
    with any #fragment removed."""
    out = []
    for target in LINK.findall(prose(text)):
        if target.lower().startswith(EXTERNAL) or target.startswith("#"):
            continue
        out.append(target.split("#", 1)[0])
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """'target (why)' for each relative link of `page` that leaves `root` or names no
    existing file."""
    bad = []
    root = root.resolve()
    for target in relative_links(page.read_text(encoding="utf-8")):
        resolved = (page.parent / target).resolve()
        if not resolved.is_relative_to(root):
            bad.append(f"{target} (outside the repository)")
        elif not resolved.exists():
            bad.append(f"{target} (no such file)")
    return bad


def test_readme_is_at_most_12_kb():
    size = README.stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes, over {README_LIMIT}"


def test_readme_first_code_block_holds_exactly_make_demo_and_make_test():
    blocks = code_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "README.md has no code block"
    commands = [line.split("#", 1)[0].strip() for line in blocks[0]]
    assert [c for c in commands if c] == ["make demo", "make test"]


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve_to_files_inside_the_repository(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_page_mentions_shared(page):
    assert "../shared" not in page.read_text(encoding="utf-8")


def test_link_checks_catch_what_they_are_for(tmp_path):
    """Negative control: a link outside the repository, a missing file and a link hidden
    in code are told apart, so the passing tests above mean something."""
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    (tmp_path / "docs" / "here.md").write_text("x", encoding="utf-8")
    page.write_text(
        "[ok](here.md#part) [web](https://example.org/x) [anchor](#top)\n"
        "[out](../../shared/DESIGN.md) ![img](gone.png)\n"
        "```\n[in code](nowhere.md)\n```\n",
        encoding="utf-8",
    )
    assert broken_links(page, root=tmp_path) == [
        "../../shared/DESIGN.md (outside the repository)",
        "gone.png (no such file)",
    ]

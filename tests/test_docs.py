"""The front page and the reference: README.md's relative links land on files (and headings)
that exist, as GitHub resolves them; the two commands stay at the top, the same as CI's; every
page in docs/ is in mkdocs.yml's nav. (`mkdocs build --strict` in .ci/run checks the links
inside docs/; this checks what mkdocs never reads.)"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")
COMMAND_1 = (
    "python3 -m venv .venv && . .venv/bin/activate && "
    "pip install torch==2.13.0 -e '.[demo]' && spotstart demo"
)
COMMAND_2 = "bash tests/setup.sh && . .venv/bin/activate && pytest"


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub and mkdocs' toc both make it for the text we write."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    fence = False
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"^#{1,6} (.+)$", line)):
            out.add(_slug(m.group(1)))
    return out


def _relative_links(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # links in code blocks are not links
    return [u for u in LINK.findall(text) if not re.match(r"^[a-z]+:", u)]


def test_every_relative_link_in_the_readme_lands_on_a_file_and_heading() -> None:
    links = _relative_links(README.read_text())
    assert any(u.startswith("docs/") for u in links), "the front page links into docs/"
    broken = []
    for url in links:
        path, _, anchor = url.partition("#")
        target = (ROOT / path) if path else README
        if not target.exists():
            broken.append(f"{url}: no {path}")
        elif anchor and anchor not in _anchors(target):
            broken.append(f"{url}: no heading #{anchor} in {path or 'README.md'}")
    assert not broken, broken


def test_the_link_check_finds_a_broken_link() -> None:
    [bad] = _relative_links("see [fetch](docs/fetch.md) and [gone](docs/no-such-page.md)")[1:]
    assert not (ROOT / bad).exists()
    assert "what-fetch-does" in _anchors(ROOT / "docs" / "fetch.md")
    assert "no-such-heading" not in _anchors(ROOT / "docs" / "fetch.md")


def test_the_two_commands_open_the_readme_and_ci_runs_the_second() -> None:
    head = README.read_text().split("\n## ", 1)[0]
    assert COMMAND_1 in head and COMMAND_2 in head
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash tests/setup.sh && . .venv/bin/activate" in ci


def test_every_docs_page_is_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    assert pages and all(f": {name}" in nav for name in pages), pages


def test_mkdocs_strict_fails_on_a_broken_link_inside_docs(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")  # the `docs` extra, in `dev`
    project = tmp_path / "p"
    shutil.copytree(ROOT / "docs", project / "docs")
    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    page = project / "docs" / "index.md"
    page.write_text(page.read_text() + "\n[gone](no-such-page.md)\n")
    mkdocs = [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")]
    res = subprocess.run(mkdocs, cwd=project, capture_output=True, text=True, check=False)
    assert res.returncode != 0 and "no-such-page.md" in res.stdout + res.stderr

"""The documentation stays true: links resolve, quoted commands and paths exist, README stays short.

Covers README.md, CHANGELOG.md and every page under docs/. Links are checked as GitHub renders them (relative to
the page, anchors by GitHub's heading slugs); commands and paths are checked inside code (inline spans, fenced
and indented blocks): ``make X`` against the Makefile's targets, ``geopose-ray SUB [SUBSUB]`` against the CLI's
parser (nested subcommands included), ``python|bash FILE`` and paths under sweeps/, launch/, bench/, docs/ against
the repository.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from geopose_ray.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md")])
README_LIMIT = 10_000  # bytes
# Material the repository does not have, spelled in parts so that this file does not name it either.
FORBIDDEN = ("GEOPOSE" + ".md", ".." + "/shared")

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^()\s]+)\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
MAKE = re.compile(r"(?:^|[\s;&|(])make\s+([A-Za-z][\w-]*)")
CLI = re.compile(r"(?:^|[\s;&|(/])geopose-ray\s+([a-z][\w-]*)(?:\s+([a-z][\w-]*))?")
SCRIPT = re.compile(r"(?:^|[\s;&|(/])(?:python3?|bash|sh)\s+((?:[\w.-]+/)*[\w.-]+\.(?:py|sh))\b")
REPO_PATH = re.compile(r"(?<![\w./$<-])((?:sweeps|launch|bench|docs)/[\w./*-]*)")


# --- reading a page ------------------------------------------------------------------------------------------------


def split_code(text: str) -> tuple[list[str], list[str]]:
    """A page's prose lines (code blocks left out) and its code: every fenced or indented block line and every
    inline code span."""
    prose: list[str] = []
    code: list[str] = []
    fenced = False
    previous_blank = True
    indented = False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if fenced:
            code.append(line)
            continue
        if line.startswith("    ") and line.strip() and (indented or previous_blank):
            indented = True  # an indented code block: after a blank line, until a line that is not indented
            code.append(line)
            continue
        if line.strip():
            indented = False
        previous_blank = not line.strip()
        prose.append(line)
        code.extend(INLINE_CODE.findall(line))
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, inline markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, duplicates numbered as GitHub numbers them."""
    prose, _ = split_code(path.read_text())
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


# --- the checks ----------------------------------------------------------------------------------------------------


def broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` whose file does not exist or whose anchor is not a heading there."""
    prose, _ = split_code(page.read_text())
    problems = []
    for line in prose:
        for target in LINK.findall(INLINE_CODE.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                problems.append(f"{page.name}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{page.name}: {target}: no heading #{anchor} in {dest.name}")
    return problems


def make_targets(makefile: Path) -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", makefile.read_text(), flags=re.M))


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommands by name (empty if it has none)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found.update(action.choices)
    return found


def missing_commands(
    code: list[str], parser: argparse.ArgumentParser, targets: set[str], root: Path = ROOT
) -> list[str]:
    """Commands and paths quoted in ``code`` that do not exist."""
    problems = []
    top = subcommands(parser)
    for snippet in code:
        for target in MAKE.findall(snippet):
            if target not in targets:
                problems.append(f"make {target}: no such target in the Makefile")
        for sub, nested in CLI.findall(snippet):
            if sub not in top:
                problems.append(f"geopose-ray {sub}: no such subcommand (known: {sorted(top)})")
                continue
            inner = subcommands(top[sub])
            if inner and nested not in inner:
                problems.append(f"geopose-ray {sub} {nested}: no such subcommand (known: {sorted(inner)})")
        for script in SCRIPT.findall(snippet):
            if not (root / script).is_file():
                problems.append(f"{script}: no such file")
        for path in REPO_PATH.findall(snippet):
            path = path.rstrip(".,;:")
            if "*" in path:
                if not list(root.glob(path)):
                    problems.append(f"{path}: matches no file")
            elif not (root / path).exists():
                problems.append(f"{path}: no such file or directory")
    return problems


def page_code(page: Path) -> list[str]:
    return split_code(page.read_text())[1]


# --- the repository's pages ----------------------------------------------------------------------------------------


def _ids(paths: list[Path]) -> Iterator[str]:
    return (str(p.relative_to(ROOT)) for p in paths)


@pytest.mark.parametrize("page", PAGES, ids=list(_ids(PAGES)))
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=list(_ids(PAGES)))
def test_every_quoted_command_and_path_exists(page: Path) -> None:
    assert missing_commands(page_code(page), build_parser(), make_targets(ROOT / "Makefile")) == []


def test_readme_is_short() -> None:
    size = (ROOT / "README.md").stat().st_size
    assert size < README_LIMIT, f"README.md is {size} bytes; move detail into docs/"


@pytest.mark.parametrize("page", PAGES, ids=list(_ids(PAGES)))
def test_no_page_cites_material_outside_the_repository(page: Path) -> None:
    text = page.read_text()
    assert [f for f in FORBIDDEN if f in text] == []


def test_the_pages_are_found() -> None:
    names = {str(p.relative_to(ROOT)) for p in PAGES}
    assert {"README.md", "CHANGELOG.md", "docs/index.md", "docs/testing.md", "docs/benchmarks/index.md"} <= names


# --- the checkers themselves ---------------------------------------------------------------------------------------


def _page(tmp_path: Path, text: str) -> Path:
    (tmp_path / "other.md").write_text("# Title\n\n## The sweep's files\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(text)
    return page


@pytest.mark.parametrize(
    "text, broken",
    [
        ("[ok](other.md)", False),
        ("[ok](other.md#the-sweeps-files)", False),
        ("[ok](other.md#twice-1)", False),
        ("[ok](#local)\n\n## Local\n", False),
        ("[web](https://example.com/missing.md)", False),
        ("`[not a link](missing.md)`", False),
        ("```\n[in code](missing.md)\n```", False),
        ("[gone](missing.md)", True),
        ("[bad anchor](other.md#no-such-heading)", True),
        ("[third twice](other.md#twice-2)", True),
        ("![image](missing.png)", True),
    ],
)
def test_the_link_checker(tmp_path: Path, text: str, broken: bool) -> None:
    assert bool(broken_links(_page(tmp_path, text))) == broken


def _fake_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="geopose-ray")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("score")
    sweep = sub.add_parser("sweep").add_subparsers(dest="action")
    sweep.add_parser("screen")
    sweep.add_parser("promote")
    return parser


@pytest.mark.parametrize(
    "snippet, missing",
    [
        ("make demo", False),
        ("make test PYTEST_ARGS='-k cache'", False),
        ("make deploy", True),
        ("geopose-ray score --truth T --pred P", False),
        (".venv/bin/geopose-ray score --json", False),
        ("geopose-ray scores", True),
        ("geopose-ray sweep screen --config x.yaml", False),
        ("geopose-ray sweep ensemble --config x.yaml", True),
        ("geopose-ray sweep", True),
        ("python bench/x.py --tiles 4", False),
        ("python bench/y.py", True),
        ("bash launch/run.sh start", False),
        ("bench/x.py", False),
        ("sweeps/configs/none.yaml", True),
        ("launch/*.sh", False),
        ("launch/*.yaml", True),
        ("s3://bucket/geopose-sweeps/screen/", False),
    ],
)
def test_the_command_checker(tmp_path: Path, snippet: str, missing: bool) -> None:
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "x.py").write_text("")
    (tmp_path / "launch").mkdir()
    (tmp_path / "launch" / "run.sh").write_text("")
    found = missing_commands([snippet], _fake_parser(), {"demo", "test"}, root=tmp_path)
    assert bool(found) == missing, found


def test_code_is_found_in_spans_fenced_and_indented_blocks() -> None:
    text = "Run `make demo`.\n\n```\nmake test\n```\n\n    make soak\n\nprose make lint\n"
    prose, code = split_code(text)
    assert code == ["make demo", "make test", "    make soak"]
    assert "prose make lint" in prose

"""The repository stands on its own: its docs, configs and code refer only to files inside it.

A user who clones ntt has no team folder next to it. So README, docs, configs, code and experiment files
must not point at one (`../shared`), nor cite an outside method document; the method is specified in
`docs/method.md`, and every `§N.M` citation anywhere in the repository (tests included) must name a section
heading of that file, and every `§N item K` an item that section has. Tests alone may name the shared
fixture folder (they skip when it is absent).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO

METHOD = REPO / "docs" / "method.md"
# What a user-facing file must not contain (built by concatenation so this file does not match itself).
FORBIDDEN = {
    "an outside method document": "ALGO" + "RITHM",
    "the team's docs folder": "shared" + "/docs",
    "the team's shared folder": "../" + "shared",
    "an absolute team path": "/work" + "/shared",
}
# Files users get: README, docs, configs, code, experiment configs, benchmark notes.
USER_FACING = ["README.md", "docs", "conf", "ntt", "experiments", "benchmarks"]
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".txt", ".toml", ".cfg", ".ini", ".sh", ".json"}
SKIP_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache"}

_ID = r"\d+[a-z]?(?:\.\d+)*"
# `§5.7`, `§5.3-5.8`, `§3-4`, `§12b item 3`, `§9.1 items 4-5`, `§1.2 steps 1-4`
CITATION = re.compile(rf"§\s*({_ID})(?:\s*-\s*§?({_ID}))?(?:\s+(?:items?|steps?)\s+(\d+)(?:\s*-\s*(\d+))?)?")
HEADING = re.compile(rf"^#{{2,6}}\s+({_ID})\.?\s")
# A numbered item of a section: a list entry `3. ...` or a table row `| 3 | ...`.
ITEM = re.compile(r"^\s*(?:(\d+)\.\s|\|\s*(\d+)\s*\|)")

# The numbering mirrors the specification's outline; citations rely on it staying put.
REQUIRED_SECTIONS = (
    ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "12b"]
    + [f"1.{i}" for i in range(1, 7)]
    + [f"3.{i}" for i in range(1, 4)]
    + [f"5.{i}" for i in range(1, 11)]
    + [f"7.{i}" for i in range(1, 6)]
    + [f"8.{i}" for i in range(1, 5)]
    + [f"9.{i}" for i in range(1, 5)]
    + [f"11.{i}" for i in range(1, 5)]
)


def _text_files(paths: list[str]) -> list[Path]:
    out = []
    for name in paths:
        root = REPO / name
        if root.is_file():
            out.append(root)
            continue
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.suffix in TEXT_SUFFIXES and not SKIP_DIRS & set(p.parts):
                out.append(p)
    return out


def parse_sections(text: str) -> dict[str, set[int]]:
    """Section id -> the item numbers in its body (headings inside ``` fences do not count)."""
    sections: dict[str, set[int]] = {}
    current = None
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        m = HEADING.match(line)
        if m:
            current = m.group(1)
            sections.setdefault(current, set())
            continue
        m = ITEM.match(line)
        if m and current is not None:
            sections[current].add(int(m.group(1) or m.group(2)))
    return sections


def bad_citations(text: str, sections: dict[str, set[int]]) -> list[str]:
    """Every citation in ``text`` that names a missing section or a missing item, with the reason."""
    bad = []
    for m in CITATION.finditer(text):
        first, last, item_a, item_b = m.groups()
        for sec in filter(None, (first, last)):
            if sec not in sections:
                bad.append(f"{m.group(0)!r}: no section {sec}")
        if item_a and first in sections and not last:
            items = range(int(item_a), int(item_b or item_a) + 1)
            missing = [i for i in items if i not in sections[first]]
            if missing:
                bad.append(f"{m.group(0)!r}: section {first} has no item {missing}")
    return bad


@pytest.fixture(scope="module")
def sections() -> dict[str, set[int]]:
    assert METHOD.is_file(), "docs/method.md (the method specification) is missing"
    return parse_sections(METHOD.read_text())


def test_method_spec_keeps_its_numbering(sections):
    missing = [s for s in REQUIRED_SECTIONS if s not in sections]
    assert not missing, f"docs/method.md lost the sections {missing}; citations across the repo use them"


def test_user_facing_files_point_only_inside_the_repository():
    found = []
    for path in _text_files(USER_FACING):
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for what, needle in FORBIDDEN.items():
                if needle in line:
                    found.append(f"{path.relative_to(REPO)}:{n}: {what} ({needle!r}): {line.strip()[:100]}")
    assert not found, "cite docs/method.md (`method.md §N.M`) instead:\n" + "\n".join(found)


def test_tests_cite_no_outside_method_document():
    """Tests may name the shared fixture folder, but cite the method by our own document too."""
    needles = [FORBIDDEN["an outside method document"], FORBIDDEN["the team's docs folder"]]
    this = Path(__file__).resolve()
    found = [
        f"{p.relative_to(REPO)}:{n}: {line.strip()[:100]}"
        for p in _text_files(["tests"])
        if p.resolve() != this
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if any(s in line for s in needles)
    ]
    assert not found, "\n".join(found)


def test_every_section_citation_exists(sections):
    bad = []
    for path in _text_files([*USER_FACING, "tests", "Makefile", "pyproject.toml"]):
        text = path.read_text(errors="replace")
        if path.resolve() == Path(__file__).resolve():
            continue
        bad += [f"{path.relative_to(REPO)}: {b}" for b in bad_citations(text, sections)]
    assert not bad, "citations of docs/method.md that point nowhere:\n" + "\n".join(bad)


def test_citation_checker_catches_bad_citations(sections):
    """The checker itself fails on a wrong section, a wrong range end and a wrong item (known answers)."""
    assert (
        bad_citations("method.md §5.7, §5.3-5.8, §12b item 3, §9.1 items 1-2, §1.2 steps 1-4", sections) == []
    )
    assert len(bad_citations("see method.md §5.42", sections)) == 1
    assert len(bad_citations("method.md §5.3-5.42", sections)) == 1
    assert len(bad_citations("method.md §12b item 42", sections)) == 1
    assert len(bad_citations("method.md §9.1 items 12-13", sections)) == 1
    toy = parse_sections("## 1. A\n1. x\n```\n## 2. fenced, not a heading\n```\n### 1.1 B\n| 4 | row |\n")
    assert toy == {"1": {1}, "1.1": {4}}

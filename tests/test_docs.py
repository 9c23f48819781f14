"""The docs hold together: every relative link and image resolves, the README stays short and
starts with the two commands that `.ci/run` runs, and (once the layout of issue 22 is in the tree)
every repository path and module the docs name in code exists.

Markdown is read as text, nothing is rendered: links are `[text](target)` and `![alt](target)`
outside fenced blocks and code spans; anchors are GitHub's heading slugs.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted([README, ROOT / "benchmarks" / "README.md", *(ROOT / "docs").glob("*.md")])
README_MAX_LINES = 300
INSTALL_AND_RUN = ("pip install torch==2.13.0 && pip install -e . -c constraints.txt && "
                   "sdedit-batch run jobs/quickstart.yaml")
INSTALL_AND_TEST = ('pip install torch==2.13.0 && pip install -e ".[test]" -c constraints.txt && '
                    "ruff check . && pytest -q")

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_REPO_PATH = re.compile(r"(?<![\w./$-])(?:pipeline|sdedit|tests|benchmarks|jobs|docs|models)/"
                        r"[\w./-]*[\w/]")
_MODULE = re.compile(r"(?<![\w./-])(?:pipeline|sdedit)(?:\.\w+)+")
_JOB_FIELD = re.compile(r"^\|\s*`(\w+\.\w+)`\s*\|")
_PY_IMPORT = re.compile(r"^\s*from ((?:pipeline|sdedit)[\w.]*) import ([\w, ]+)$")


@dataclass(frozen=True)
class Doc:
    """One markdown file split into prose lines (with line numbers) and fenced blocks."""

    path: Path
    prose: list[tuple[int, str]]
    fences: list[tuple[str, list[str]]]
    """(info string, lines) of each fenced code block, in order."""


def read_doc(path: Path) -> Doc:
    prose: list[tuple[int, str]] = []
    fences: list[tuple[str, list[str]]] = []
    fence: tuple[str, list[str]] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if _FENCE.match(line):
            if fence is None:
                fence = (line.strip().strip("`~").strip(), [])
            else:
                fences.append(fence)
                fence = None
        elif fence is not None:
            fence[1].append(line)
        else:
            prose.append((number, line))
    return Doc(path, prose, fences)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup and punctuation dropped, lower case, '-' for spaces."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link keeps its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(doc: Doc) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, line in doc.prose:
        match = _HEADING.match(line)
        if match:
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def code_spans(doc: Doc) -> list[tuple[int, str]]:
    return [(n, m.group(2).strip()) for n, line in doc.prose for m in _CODE_SPAN.finditer(line)]


def links(doc: Doc) -> list[tuple[int, str]]:
    """Every link and image target outside code (a code span inside link text is kept as text)."""
    return [(n, m.group(1)) for n, line in doc.prose
            for m in _LINK.finditer(_CODE_SPAN.sub(lambda s: "code", line))]


def broken_links(path: Path) -> list[str]:
    """Relative links and images of one markdown file whose file or #anchor does not exist."""
    doc = read_doc(path)
    problems = []
    for number, target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue                                      # https:, mailto:: not checked here
        file_part, _, anchor = target.partition("#")
        where = f"{path.relative_to(ROOT)}:{number}: {target}"
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists():
            problems.append(f"{where}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(read_doc(linked)):
            problems.append(f"{where}: no heading with anchor #{anchor} in {linked.name}")
    return problems


def _module_problem(name: str) -> str | None:
    """None when `name` is a module or package of this tree, optionally followed by a name that
    occurs in that module's source (`pipeline.output.manifest.ERROR_KINDS`); else what is
    missing."""
    parts = name.split(".")
    path = ROOT / parts[0]
    for i, part in enumerate(parts[1:], start=1):
        if (path / part).is_dir() and (path / part / "__init__.py").exists():
            path = path / part
        elif (path / f"{part}.py").exists():
            path = path / f"{part}.py"
        else:
            source = path / "__init__.py" if path.is_dir() else path
            if i != len(parts) - 1 or not re.search(rf"\b{re.escape(part)}\b",
                                                    source.read_text(encoding="utf-8")):
                return f"no module or name {'.'.join(parts[:i + 1])}"
            return None
        if path.suffix == ".py" and i < len(parts) - 1:
            return _module_problem_in_file(path, parts[i + 1:], name)
    return None


def _module_problem_in_file(path: Path, rest: list[str], name: str) -> str | None:
    """`module.attr` (or `module.Class.method`): the first name must occur in the module."""
    if not re.search(rf"\b{re.escape(rest[0])}\b", path.read_text(encoding="utf-8")):
        return f"{rest[0]} is not in {path.relative_to(ROOT)} ({name})"
    return None


def job_fields() -> set[str]:
    """`section.field` of the job file reference (`sdedit.seed` is a setting, not a module)."""
    return {m.group(1) for _, line in read_doc(ROOT / "docs" / "jobs.md").prose
            if (m := _JOB_FIELD.match(line))}


def missing_code_names(path: Path) -> list[str]:
    """Repository paths and pipeline / sdedit modules named in code spans, and the imports of
    Python blocks, that do not exist in this tree (job settings such as `sdedit.t0` aside)."""
    doc = read_doc(path)
    fields = job_fields()
    problems = []
    for number, span in code_spans(doc):
        where = f"{path.relative_to(ROOT)}:{number}: `{span}`"
        for found in _REPO_PATH.finditer(span):
            if not (ROOT / found.group(0)).exists():
                problems.append(f"{where}: no file or folder {found.group(0)}")
        for found in _MODULE.finditer(span):
            if found.group(0) not in fields and (problem := _module_problem(found.group(0))):
                problems.append(f"{where}: {problem}")
    for info, lines in doc.fences:
        if info not in ("python", "py"):
            continue
        for line in lines:
            match = _PY_IMPORT.match(line)
            if match:
                names = [match.group(1)] + [f"{match.group(1)}.{n.strip()}"
                                            for n in match.group(2).split(",")]
                problem = next((p for p in map(_module_problem, names) if p), None)
                if problem:
                    problems.append(f"{path.relative_to(ROOT)}: `{line.strip()}`: {problem}")
    return problems


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_images_resolve(path: Path) -> None:
    assert path.exists()
    assert broken_links(path) == []


def test_docs_pages_are_linked_from_the_readme() -> None:
    linked = {(README.parent / target.partition("#")[0]).resolve()
              for _, target in links(read_doc(README))}
    assert [p.name for p in DOCS if p != README and p.resolve() not in linked] == []


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    first_info, first_block = read_doc(README).fences[0]
    assert first_block == [INSTALL_AND_RUN, INSTALL_AND_TEST]
    # the first fenced block is the README's opening: only the title comes before it
    assert [line for line in lines[:lines.index(INSTALL_AND_RUN)] if line.strip()] == \
        ["# sdedit-batch", f"```{first_info}"]


def test_ci_runs_the_readme_test_command() -> None:
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.startswith("#")]
    assert ci[-1] == INSTALL_AND_TEST


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_and_modules_named_in_code_exist(path: Path) -> None:
    assert missing_code_names(path) == []


def test_the_checks_find_what_is_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks above can fail: a missing file, a missing anchor, a missing module."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "real.py").write_text("THING = 1\n")
    (tmp_path / "other.md").write_text("# A `real` heading: yes\n## A `real` heading: yes\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "jobs.md").write_text("| field |\n|---|\n| `pipeline.seed` | x |\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n"
        "[ok](other.md#a-real-heading-yes) [ok twice](other.md#a-real-heading-yes-1) "
        "![img](other.md) [web](https://example.com/x) [self](#page)\n"
        "[gone](missing.md) [no anchor](other.md#nowhere) [`code` text](#nope)\n"
        "`pipeline/real.py` `pipeline.real.THING` `pipeline/gone.py` `pipeline.real.NOTHING`"
        " `pipeline.gone` `--set pipeline.seed=1` `python docs/gone.py --x pipeline.real`\n"
        "```python\nfrom pipeline.real import THING, other\n[not a link](nowhere.md)\n```\n")
    assert broken_links(page) == [
        "page.md:3: missing.md: no file " + str(tmp_path / "missing.md"),
        "page.md:3: other.md#nowhere: no heading with anchor #nowhere in other.md",
        "page.md:3: #nope: no heading with anchor #nope in page.md"]
    assert missing_code_names(page) == [
        "page.md:4: `pipeline/gone.py`: no file or folder pipeline/gone.py",
        "page.md:4: `pipeline.real.NOTHING`: NOTHING is not in pipeline/real.py "
        "(pipeline.real.NOTHING)",
        "page.md:4: `pipeline.gone`: no module or name pipeline.gone",
        "page.md:4: `python docs/gone.py --x pipeline.real`: no file or folder docs/gone.py",
        "page.md: `from pipeline.real import THING, other`: other is not in pipeline/real.py "
        "(pipeline.real.other)"]

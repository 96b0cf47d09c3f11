"""The repository's code and docs cite only documents the repository ships.

(a) No citation of documents outside the repository: the word ``SPEC`` used as a citation, or a
    path into ``../shared``. The algorithm notes are docs/ALGORITHMS.md, the CPU notes
    docs/MEGATRON_CPU.md.
(b) Every ``docs/<NAME>.md`` named anywhere exists.
(c) Every section cited as ``docs/ALGORITHMS.md §N`` / ``docs/ALGORITHMS.md, section N`` (also
    ``§N-M``, ``§N and §M``) is a ``## N.`` heading of docs/ALGORITHMS.md.
(d) Every relative markdown link in README.md, docs/*.md, examples/README.md and configs/README.md
    resolves to an existing file or folder (and, for a link into a markdown file with ``#anchor``,
    to one of its headings).
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()

# Folders and files whose text is checked (configs/ only where it exists).
SCANNED = ("stablemoe_megatron", "tests", "tools", "examples", "slurm", "bench", "docs", "configs",
           "README.md", "setup.py")
TEXT_SUFFIXES = {".py", ".md", ".sh", ".sbatch", ".yaml", ".yml", ".json", ".txt", ".cfg", ".ini",
                 ".toml"}
SKIPPED_DIRS = {"__pycache__", ".pytest_cache"}

# Lines that mention the word on purpose, not as a citation: (file, text the line contains).
NOT_CITATIONS = (
    # The generated routing report must not cite it: the test asserts its absence.
    ("tests/test_routing_report.py", '"SPEC" not in text'),
)

OUTSIDE_CITATION = re.compile(r"\bSPEC\b|\.\./shared\b")
DOCS_FILE = re.compile(r"(?<![\w-])docs/([\w.-]+\.md)\b")
NUMBER_OR_RANGE = r"\d+(?:\s*[-\u2013]\s*\d+)?"
SECTION_REF = re.compile(
    r"docs/ALGORITHMS\.md"
    r"(?P<tail>(?:\s*,\s*sections?\s+|\s*\u00a7\s*)" + NUMBER_OR_RANGE
    + r"(?:\s*(?:,|and|or)\s*(?:\u00a7\s*|sections?\s+)?" + NUMBER_OR_RANGE + r")*)"
)
SECTION_HEADING = re.compile(r"^## (\d+)\. ", re.MULTILINE)
MD_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)


def _scanned_files():
    files = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(p for p in sorted(path.rglob("*"))
                         if p.is_file() and p.suffix in TEXT_SUFFIXES
                         and not SKIPPED_DIRS.intersection(p.relative_to(ROOT).parts))
    return [p for p in files if p.resolve() != THIS]


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


FILES = _scanned_files()


def test_scan_finds_the_repository():
    names = {_rel(p) for p in FILES}
    assert {"README.md", "setup.py", "docs/ALGORITHMS.md", "docs/MEGATRON_CPU.md",
            "stablemoe_megatron/cpu_compat.py"} <= names


def test_no_citation_of_documents_outside_the_repository():
    found = []
    for path in FILES:
        rel = _rel(path)
        for number, line in enumerate(_read(path).splitlines(), 1):
            if not OUTSIDE_CITATION.search(line):
                continue
            if any(rel == where and text in line for where, text in NOT_CITATIONS):
                continue
            found.append(f"{rel}:{number}: {line.strip()}")
    assert not found, ("cite docs/ALGORITHMS.md (section N) or docs/MEGATRON_CPU.md instead:\n"
                       + "\n".join(found))


def test_every_named_docs_file_exists():
    missing = []
    for path in FILES:
        for match in DOCS_FILE.finditer(_read(path)):
            if not (ROOT / "docs" / match.group(1)).is_file():
                missing.append(f"{_rel(path)}: docs/{match.group(1)}")
    assert not missing, "named but missing:\n" + "\n".join(missing)


def _algorithm_sections():
    return {int(n) for n in SECTION_HEADING.findall(_read(ROOT / "docs" / "ALGORITHMS.md"))}


def _cited_sections(tail: str):
    for low, high in re.findall(r"(\d+)(?:\s*[-\u2013]\s*(\d+))?", tail):
        yield from range(int(low), int(high or low) + 1)


def test_algorithms_sections_are_numbered_in_order():
    numbers = [int(n) for n in SECTION_HEADING.findall(_read(ROOT / "docs" / "ALGORITHMS.md"))]
    assert numbers == list(range(1, len(numbers) + 1)), numbers


def test_every_cited_algorithms_section_exists():
    sections = _algorithm_sections()
    bad, cited = [], 0
    for path in FILES:
        for match in SECTION_REF.finditer(_read(path)):
            for number in _cited_sections(match.group("tail")):
                cited += 1
                if number not in sections:
                    bad.append(f"{_rel(path)}: {match.group(0)!r} (section {number})")
    assert cited, "no section citations found: the pattern no longer matches the citations"
    assert not bad, f"sections of docs/ALGORITHMS.md are {sorted(sections)}:\n" + "\n".join(bad)


@pytest.mark.parametrize("tail, expected", [
    (" \u00a75", [5]), (", section 5", [5]), (" \u00a72-3", [2, 3]), (" \u00a72 and \u00a74", [2, 4]),
    (", sections 2 and 4", [2, 4]), (" \u00a72-4", [2, 3, 4]),
])
def test_section_reference_pattern(tail, expected):
    match = SECTION_REF.search("see docs/ALGORITHMS.md" + tail + ") for details")
    assert match and list(_cited_sections(match.group("tail"))) == expected


def _github_slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(markdown_file: Path):
    text = FENCE.sub("", _read(markdown_file))
    slugs, seen = set(), {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.MULTILINE):
        slug = _github_slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        slugs.add(slug if count == 0 else f"{slug}-{count}")
    return slugs


def _markdown_files():
    files = [ROOT / "README.md", ROOT / "examples" / "README.md", ROOT / "configs" / "README.md"]
    files += sorted((ROOT / "docs").glob("*.md"))
    return [f for f in files if f.is_file()]


@pytest.mark.parametrize("markdown", [_rel(f) for f in _markdown_files()])
def test_relative_markdown_links_resolve(markdown):
    source = ROOT / markdown
    broken = []
    for target in MD_LINK.findall(FENCE.sub("", _read(source))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
            continue  # http:, https:, mailto: ...
        path_part, _, anchor = target.partition("#")
        resolved = (source.parent / path_part).resolve() if path_part else source
        if not resolved.exists():
            broken.append(f"{target}: no {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor.lower() not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {_rel(resolved)}")
    assert not broken, f"{markdown}:\n" + "\n".join(broken)

"""Build the bundled English corpus (data/corpus/{train,valid,test}.jsonl) from the Python 3.11 docs.

Source: the reStructuredText sources shipped in the Debian package ``python3.11-doc``
(PSF licence). Get them offline-reproducibly with::

    apt-get download python3.11-doc            # python3.11-doc_3.11.2-6+deb12u8_all.deb on Debian 12
    python tools/build_corpus.py python3.11-doc_3.11.2-6+deb12u8_all.deb --output-dir data/corpus

or point it at an extracted ``.../usr/share/doc/python3.11/html/_sources`` directory.

What it does, deterministically (same input, same bytes out):

1. strips reST markup to readable prose (see ``tools/rst_to_text.py``): roles (:func:`len` ->
   len()), literals, links, emphasis, substitutions, section adornments, comments, targets,
   bookkeeping directives and option lines go; signatures, admonitions and version notes stay as
   text; code and literal blocks stay as plain text unless longer than ``--max-code-lines``;
   prose paragraphs are joined into single lines;
2. splits every file into documents, one per top-level section (the sections right below the page
   title); a section over ``--max-doc-bytes`` is split at its subsections (then at paragraphs), and
   pieces under ``--min-doc-bytes`` are merged into a neighbour from the same page;
3. drops near-empty documents (under ``--min-prose-bytes`` of non-code text) and the pages named by
   ``--exclude`` (default: the release notes ``whatsnew/``, changelogs in all but name, and the
   removed ``distutils/``), which keeps the corpus under 8 MB;
4. assigns each document to train/valid/test (about 96/2/2) by a SHA-256 hash of its source path
   and title, so the split of a document never depends on the others.
"""
import argparse
import collections
import hashlib
import io
import json
import os
import re
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rst_to_text import ADORNMENT_RE, SUBSTITUTIONS, Context, Renderer, heading_at, render_inline  # noqa: E402

SOURCES_MARKER = "/html/_sources/"
# Release notes are changelogs (whatsnew/changelog is the raw NEWS file); distutils was removed in
# 3.12. Leaving them out keeps the corpus under 8 MB. Entries ending in "/" are folder prefixes.
DEFAULT_EXCLUDES = ("whatsnew/", "distutils/")
SPLITS = (("valid", 200), ("test", 200))  # per 10,000 hash buckets; the rest is train
LABEL_RE = re.compile(r"^\.\.\s+_([^:]+):\s*$")
SUBST_DEF_RE = re.compile(r"^\.\.\s+\|([^|]+)\|\s+replace::\s+(.*)$")


# ---- pages -> documents -------------------------------------------------------------------------

def blocks_to_text(blocks) -> str:
    return "\n\n".join(text for _, text in blocks)


def prose_bytes(blocks) -> int:
    return sum(len(text.encode("utf-8")) for kind, text in blocks if kind != "code")


def find_headings(lines):
    """``[(line_index, level, title)]`` for a page; levels follow the order adornment styles appear."""
    styles, headings, i = [], [], 0
    while i < len(lines):
        heading = heading_at(lines, i)
        if heading is None:
            i += 1
            continue
        span, title, style = heading
        if style not in styles:
            styles.append(style)
        headings.append((i, styles.index(style) + 1, title))
        i += span
    return headings


class PageSplitter:
    """Splits one page into documents of roughly ``min_bytes``..``max_bytes`` rendered text."""

    def __init__(self, renderer: Renderer, min_bytes: int, max_bytes: int):
        self.renderer = renderer
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes

    def split(self, lines):
        """``[(title, blocks)]``: top-level sections (level <= 2), oversized ones split further."""
        headings = find_headings(lines)
        pieces = self.split_range(lines, headings, 0, len(lines), 2)
        return self.merge_small(pieces)

    def split_range(self, lines, headings, lo: int, hi: int, level: int):
        inner = [h for h in headings if lo <= h[0] < hi]
        cuts = sorted({lo} | {h[0] for h in inner if h[1] <= level and h[0] > lo})
        pieces = []
        for start, stop in zip(cuts, cuts[1:] + [hi]):
            blocks = self.renderer.render(lines[start:stop])
            title = next((h[2] for h in inner if start <= h[0] < stop), None)
            title = render_inline(title, self.renderer.ctx) if title else None
            size = len(blocks_to_text(blocks).encode("utf-8"))
            has_deeper = any(start < h[0] < stop and h[1] > level for h in inner)
            if size > self.max_bytes and has_deeper:
                pieces.extend(self.split_range(lines, headings, start, stop, level + 1))
            elif size > self.max_bytes:
                pieces.extend((title, part) for part in self.split_blocks(blocks))
            elif blocks:
                pieces.append((title, blocks))
        return pieces

    def split_blocks(self, blocks):
        """Greedy split of a heading-less oversized section at block boundaries."""
        parts, current, size = [], [], 0
        for block in blocks:
            block_size = len(block[1].encode("utf-8")) + 2
            if current and size + block_size > self.max_bytes:
                parts.append(current)
                current, size = [], 0
            current.append(block)
            size += block_size
        return parts + ([current] if current else [])

    def merge_small(self, pieces):
        merged = []
        for title, blocks in pieces:
            size = len(blocks_to_text(blocks).encode("utf-8"))
            if merged and size < self.min_bytes:
                prev_title, prev_blocks = merged[-1]
                if len(blocks_to_text(prev_blocks).encode("utf-8")) + size <= self.max_bytes:
                    merged[-1] = (prev_title, prev_blocks + blocks)
                    continue
            if merged and len(blocks_to_text(merged[-1][1]).encode("utf-8")) < self.min_bytes:
                prev_title, prev_blocks = merged[-1]
                merged[-1] = (prev_title or title, prev_blocks + blocks)
                continue
            merged.append((title, blocks))
        return merged


# ---- reading the sources ------------------------------------------------------------------------

def read_sources(path: str):
    """``{page path ('library/json.rst'): text}`` from a _sources directory or a .deb package."""
    if os.path.isdir(path):
        pages = {}
        for root, _, files in os.walk(path):
            for name in files:
                if name.endswith(".rst.txt"):
                    full = os.path.join(root, name)
                    rel = os.path.relpath(full, path).replace(os.sep, "/")
                    with open(full, encoding="utf-8") as f:
                        pages[rel[: -len(".txt")]] = f.read()
        return pages
    if path.endswith(".deb") and os.path.isfile(path):
        return read_deb(path)
    raise SystemExit(f"build_corpus.py: error: {path} is neither a _sources directory nor a .deb file; "
                     "run `apt-get download python3.11-doc` and pass the .deb")


def ar_members(data: bytes):
    """Yield ``(name, payload)`` for each member of an ar archive (a .deb is one: debian-binary,
    control.tar.*, data.tar.*). Shared with tools/build_large_corpus.py, which also reads control."""
    pos = 8
    while pos + 60 <= len(data):
        name = data[pos:pos + 16].decode().strip().rstrip("/")
        size = int(data[pos + 48:pos + 58].decode().strip())
        yield name, data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)


def read_deb(path: str):
    """Read the reST sources straight out of a .deb (an ar archive holding data.tar.xz)."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(b"!<arch>\n"):
        raise SystemExit(f"build_corpus.py: error: {path} is not a .deb (ar) archive")
    name, payload = "", None
    for name, member in ar_members(data):
        if name.startswith("data.tar"):
            payload = member
            break
    if payload is None or name.endswith(".zst"):
        raise SystemExit(f"build_corpus.py: error: {path}: no data.tar.xz/gz member; extract it with "
                         "`dpkg-deb -x` and pass the .../html/_sources directory")
    pages = {}
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
        for member in tar:
            if member.isfile() and SOURCES_MARKER in member.name and member.name.endswith(".rst.txt"):
                rel = member.name.split(SOURCES_MARKER, 1)[1][: -len(".txt")]
                pages[rel] = tar.extractfile(member).read().decode("utf-8")
    return pages


def collect_titles(pages):
    """Labels (``.. _label:`` right before a title) and page paths -> their title text."""
    label_titles, doc_titles = {}, {}
    for page, text in pages.items():
        lines = text.splitlines()
        for index, (line_no, _, title) in enumerate(find_headings(lines)):
            if index == 0:
                doc_titles[page[: -len(".rst")]] = title
            k = line_no - 1
            # walk back over blank lines, overlines, labels and body-less directives (".. program::")
            while k >= 0 and (not lines[k].strip() or lines[k].startswith("..") or ADORNMENT_RE.match(lines[k])):
                label = LABEL_RE.match(lines[k])
                if label:
                    label_titles[label.group(1).strip().lower()] = title
                k -= 1
    plain = Context()
    label_titles = {k: render_inline(v, plain) for k, v in label_titles.items()}
    doc_titles = {k: render_inline(v, plain) for k, v in doc_titles.items()}
    return label_titles, doc_titles


# ---- split assignment and output ----------------------------------------------------------------

def split_of(source: str, title: str, splits=SPLITS) -> str:
    """train/valid/test from a stable hash of the document's path and title (``splits``: widths
    per 10,000 buckets, in order; the rest is train)."""
    bucket = int(hashlib.sha256(f"{source}\n{title}".encode("utf-8")).hexdigest(), 16) % 10_000
    for name, width in splits:
        if bucket < width:
            return name
        bucket -= width
    return "train"


def page_documents(page: str, text: str, ctx: Context, args,
                   substitutions=SUBSTITUTIONS, renderer_class=Renderer):
    """``[(title, text)]`` for one page, near-empty documents dropped. ``substitutions`` (|version|
    and the like) and ``renderer_class`` let tools/build_large_corpus.py render other Sphinx projects."""
    ctx.substitutions = dict(substitutions)
    for line in text.splitlines():
        definition = SUBST_DEF_RE.match(line)
        if definition:
            ctx.substitutions[definition.group(1)] = definition.group(2).strip()
    splitter = PageSplitter(renderer_class(ctx, args.max_code_lines), args.min_doc_bytes, args.max_doc_bytes)
    documents, seen = [], collections.Counter()
    for title, blocks in splitter.split(text.splitlines()):
        if prose_bytes(blocks) < args.min_prose_bytes:
            continue
        title = title or page
        seen[title] += 1
        unique_title = title if seen[title] == 1 else f"{title} ({seen[title]})"
        documents.append((unique_title, blocks_to_text(blocks)))
    return documents


def build(args):
    pages = read_sources(args.source)
    if not pages:
        raise SystemExit(f"build_corpus.py: error: no .rst.txt files found in {args.source}")
    ctx = Context(*collect_titles(pages))
    splits = {"train": [], "valid": [], "test": []}
    for page in sorted(pages):
        if any(page == ex or (ex.endswith("/") and page.startswith(ex)) for ex in args.exclude):
            continue
        for title, text in page_documents(page, pages[page], ctx, args):
            record = {"text": text, "source": page, "title": title}
            splits[split_of(page, title)].append(record)
    os.makedirs(args.output_dir, exist_ok=True)
    for name, records in splits.items():
        path = os.path.join(args.output_dir, f"{name}.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(path + ".tmp", path)
        print(f"{name}: {len(records)} documents, {os.path.getsize(path)} bytes "
              f"({sum(len(r['text'].encode('utf-8')) for r in records)} bytes of text) -> {path}")
    return splits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="python3.11-doc .deb, or its extracted .../html/_sources directory")
    p.add_argument("--output-dir", default="data/corpus")
    p.add_argument("--exclude", nargs="*", default=list(DEFAULT_EXCLUDES),
                   help="pages to leave out (e.g. library/os.rst); a trailing / excludes a folder")
    p.add_argument("--max-code-lines", type=int, default=40, help="drop code blocks longer than this")
    p.add_argument("--min-doc-bytes", type=int, default=1000)
    p.add_argument("--max-doc-bytes", type=int, default=20000)
    p.add_argument("--min-prose-bytes", type=int, default=300, help="drop documents with less prose")
    build(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

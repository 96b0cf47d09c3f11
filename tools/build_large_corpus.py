"""Build a large English corpus (20 M+ tokens) from the documentation shipped in Debian packages.

Reads the documentation sources of the Debian 12 packages in DEFAULT_PACKAGES (data/LARGE_CORPUS.md
lists versions, licences and sizes) and writes data/large_corpus/{train,valid,test}.jsonl
(git-ignored; {"text", "package", "source", "title"} per line) and manifest.json (packages,
versions, SHA-256 of the inputs, counts per split and package, options). The bundled data/corpus/
stays for the quick start and CI. Inputs: .deb files, or package trees with DEBIAN/control
(``dpkg-deb -R`` output). Same inputs, in any order -> same bytes. Example::

    python tools/build_large_corpus.py --download          # apt-get download, build data/large_corpus/

1. formats: Sphinx reST sources (``_sources/*.txt``; ``*.rst`` in a package without _sources) via
   tools/rst_to_text.py (autodoc, kernel-doc and diagram directives dropped); POD (``*.pod``,
   ``*.pm``) via Pod::Text; AsciiDoc (``*.adoc``, git-doc's ``*.txt``) via ``asciidoc_items``.
   Code blocks over --max-code-lines are dropped; Markdown and notebooks are skipped.
2. not prose, dropped: changelogs and release notes, generated indexes and listings, translations
   (GENERIC_EXCLUDE, EXCLUDES); documents with under --min-prose-bytes of prose.
3. one document per top-level section (small files stay whole); duplicate documents and
   boilerplate paragraphs dropped (``Deduper``); train/valid/test 98/1/1 by SHA-256 of package,
   path and title, so a document's split never depends on the others.
"""
import argparse
import collections
import glob
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import unicodedata

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from build_corpus import (SUBSTITUTIONS, PageSplitter, ar_members, blocks_to_text,  # noqa: E402
                          collect_titles, page_documents, prose_bytes, split_of)
from markup_items import ADOC_ATTRS, asciidoc_items, pod_items  # noqa: E402
from rst_to_text import DIRECTIVE_RE, Context, Renderer  # noqa: E402

# Licence -> packages, hand-checked against each package's copyright file (Files: *).
LICENCES = {
    "Apache-2.0": "barbican-doc ceilometer-doc cinder-doc designate-doc glance-doc heat-doc ironic-doc "
                  "keystone-doc manila-doc mapproxy-doc murano-doc neutron-doc nova-doc octavia-doc "
                  "openvswitch-doc placement-doc python-cryptography-doc python-openstackclient-doc "
                  "python-tornado-doc python-xarray-doc swift-doc trove-doc watcher-doc",
    "Apache-2.0 WITH LLVM-exception": "clang-15-doc llvm-15-doc",
    "BSD-2-Clause": "ganeti-doc numba-doc python-behave-doc python-celery-doc sphinx-doc",
    "BSD-3-Clause": "borgbackup-doc cmake-doc python-astropy-doc python-cherrypy3-doc python-dask-doc "
                    "python-distributed-doc python-flask-doc python-ipython-doc python-kombu-doc "
                    "python-notebook-doc python-pandas-doc python-sklearn-doc python-sympy-doc "
                    "python-werkzeug-doc",
    "MIT": "pypy3-doc python-peewee-doc python-pytest-doc python-sqlalchemy-doc renpy-doc snakemake-doc "
           "twisted-doc",
    "GPL-1.0+ or Artistic-1.0": "perl-doc perl-modules-5.36",
    "GPL-2.0": "buildbot-doc developers-reference gammu-doc git-doc linux-doc-6.1 ns3-doc",
    "GPL-2.0+": "debian-policy frr-doc pylint-doc sagemath-doc", "GPL-3.0": "mailman3-doc",
    "GPL-3.0+": "cdist-doc kitty-doc lava-server-doc", "GPL-3.0+ and Apache-2.0": "rsyslog-doc",
    "HPND (PIL licence)": "python-pil-doc", "MPL-2.0": "python-hypothesis-doc",
    "PSF-2.0 (code examples also 0BSD)": "python3.11-doc",
    "public domain": "docutils-doc",
}
DEFAULT_PACKAGES = {name: lic for lic, names in LICENCES.items() for name in names.split()}
# Not prose: changelogs/release notes, generated indexes, translations; per package: generated
# listings (perltoc, perluniprops, git's cmds-*.txt, clang's generated references), non-English.
GENERIC_EXCLUDE = re.compile(r"(^|/)(changelog|changes|news|history|release[-_ ]?notes?|relnotes|"
                             r"whats_?new|genindex)([-_./]|$)|(^|/)translations/", re.I)
EXCLUDES = {
    "perl-doc": r"/perl\d*delta\.pod|/perl(toc|uniprops|hist|modlib|cn|jp|ko|tw)\.pod",
    "git-doc": r"/cmds-[\w-]+\.txt$|/howto-index\.txt$",
    "clang-15-doc": r"/(AttributeReference|DiagnosticsReference|ClangCommandLineReference)\.rst",
    "cmake-doc": r"/_sources/release/", "linux-doc-6.1": r"/_sources/ABI/",
    "python-pandas-doc": r"/_sources/reference/api/", "python-sklearn-doc": r"/_sources/modules/generated/",
    "sagemath-doc": r"/html/(?!en/)[a-z][a-z]/", "numba-doc": r"/autogen_\w+_listing",
    "python-pytest-doc": r"/_sources/announce/", "llvm-15-doc": r"/_sources/AMDGPU/",
}
TXT_FORMATS = {"git-doc": "asciidoc", "docutils-doc": "rst"}  # packages whose doc *.txt are sources
SPLITS = (("valid", 100), ("test", 100))  # per 10,000 hash buckets; the rest is train
# Directives of other Sphinx projects: no prose in the sources (autodoc, kernel-doc, diagrams,
# generated tables), or code.
EXTRA_DROP = set("""automodule autoclass autofunction automethod autoattribute autodata autoexception
    autosummary autoprogram autoprogram-cliff kernel-doc kernel-abi kernel-feat kernel-include
    maintainers-include kernel-figure kernel-render graphviz digraph graph inheritance-diagram plot
    math todo todolist mermaid uml blockdiag seqdiag nwdiag actdiag program-output command-output
    show-options rest_method rest_parameters rest_expand_all support_matrix feature_matrix bokeh-plot
    exec youtube cssclass""".split())
EXTRA_CODE = {"ipython", "jupyter-execute", "prompt", "console", "code-cell"}


class DocRenderer(Renderer):
    """The CPython-docs renderer, plus the directives other Sphinx projects use (EXTRA_*)."""

    def explicit_markup(self, out, first: str, block) -> None:
        directive = DIRECTIVE_RE.match(first)
        name = directive.group(1).split(":")[-1] if directive else ""
        if name in EXTRA_DROP:
            return
        if name in EXTRA_CODE:
            first = ".. code-block:: " + (directive.group(2) or "")
        super().explicit_markup(out, first, block)


# ---- reading packages ---------------------------------------------------------------------------

def source_format(package: str, path: str, has_sources: bool):
    """"rst", "pod", "asciidoc" or None for one file path (a trailing .gz already removed)."""
    if "/_sources/" in path:
        return "rst" if path.endswith(".txt") and not path.endswith((".md.txt", ".ipynb.txt")) else None
    if path.endswith(".rst") and not has_sources:
        return "rst"
    if path.endswith((".pod", ".pm")):
        return "pod"
    if path.endswith((".adoc", ".asciidoc")):
        return "asciidoc"
    if package in TXT_FORMATS and path.endswith(".txt") and path.startswith("usr/share/doc/"):
        return TXT_FORMATS[package]
    return None


def wanted(path: str) -> bool:
    """Files worth keeping in memory: possible documentation sources."""
    return re.sub(r"\.gz$", "", path).endswith((".txt", ".rst", ".pod", ".pm", ".adoc", ".asciidoc"))


def deb_contents(path: str):
    """``(control text, [(path, bytes)] of wanted files, sha256, size)`` of a .deb."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(b"!<arch>\n"):
        raise SystemExit(f"build_large_corpus.py: error: {path} is not a .deb (ar) archive")
    control, files = "", []
    for name, payload in ar_members(data):
        if name.endswith(".zst"):
            raise SystemExit(f"build_large_corpus.py: error: {path}: {name} is zstd; run "
                             "`dpkg-deb -R FILE DIR` and pass DIR")
        if name.startswith(("control.tar", "data.tar")):
            with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
                for member in tar:
                    rel = re.sub(r"^\./", "", member.name)
                    if name.startswith("control.tar") and rel == "control":
                        control = tar.extractfile(member).read().decode("utf-8")
                    elif name.startswith("data.tar") and member.isfile() and wanted(rel):
                        files.append((rel, tar.extractfile(member).read()))
    return control, files, hashlib.sha256(data).hexdigest(), len(data)


def dir_contents(path: str):
    """Like ``deb_contents`` for a package tree; its checksum covers every file's path and content."""
    with open(os.path.join(path, "DEBIAN", "control"), encoding="utf-8") as f:
        control = f.read()
    files, tree, size = [], hashlib.sha256(), 0
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(root, name), path).replace(os.sep, "/")
            if not rel.startswith("DEBIAN/") and os.path.isfile(os.path.join(path, rel)):
                with open(os.path.join(path, rel), "rb") as f:
                    content = f.read()
                tree.update(f"{rel}\0{hashlib.sha256(content).hexdigest()}\n".encode())
                size += len(content)
                files += [(rel, content)] if wanted(rel) else []
    return control, files, tree.hexdigest(), size


def read_package(path: str) -> dict:
    """Name, version, checksum, licence and doc sources ``{path: text}`` (.gz undone) of a package."""
    if os.path.isfile(os.path.join(path, "DEBIAN", "control")):
        control, files, sha256, size = dir_contents(path)
    elif os.path.isfile(path) and path.endswith(".deb"):
        control, files, sha256, size = deb_contents(path)
    else:
        raise SystemExit(f"build_large_corpus.py: error: {path} is neither a .deb nor a package tree "
                         "with DEBIAN/control")
    fields = dict(re.findall(r"^([\w-]+):[ \t]*(.*?)\s*$", control, re.M))
    if not fields.get("Package") or not fields.get("Version"):
        raise SystemExit(f"build_large_corpus.py: error: {path}: no Package/Version in its control data")
    texts = {}
    for rel, content in files:
        if rel.endswith(".gz"):
            rel, content = rel[:-3], gzip.decompress(content)
        texts[rel] = content.decode("utf-8", errors="replace")
    return {"package": fields["Package"], "version": fields["Version"], "file": os.path.basename(
        path.rstrip("/")), "sha256": sha256, "bytes": size, "texts": texts,
        "licence": DEFAULT_PACKAGES.get(fields["Package"], "not checked: see its copyright file")}


# ---- items / reST pages -> documents ------------------------------------------------------------

def item_documents(items, page: str, args):
    """``[(title, text)]`` from items: one document per top-level section (title level <= 1),
    oversized ones split at block boundaries, small ones merged, near-empty ones dropped."""
    pieces = []
    for kind, text, level in items:
        if not pieces or (kind == "title" and level <= 1 and any(k != "title" for k, _ in pieces[-1][1])):
            pieces.append((text if kind == "title" else None, []))
        pieces[-1][1].append((kind, text))
    splitter = PageSplitter(None, args.min_doc_bytes, args.max_doc_bytes)
    sized = [(title, part) for title, blocks in pieces for part in splitter.split_blocks(blocks)]
    documents, seen = [], collections.Counter()
    for title, blocks in splitter.merge_small(sized):
        if prose_bytes(blocks) >= args.min_prose_bytes:
            seen[title or page] += 1
            count = seen[title or page]
            documents.append((title or page if count == 1 else f"{title or page} ({count})",
                              blocks_to_text(blocks)))
    return documents


def rst_documents(texts: dict, package: str, args):
    """``{path: [(title, text)]}`` for the reST files of one package, each Sphinx project (the
    folder holding _sources/, or the whole package) with its own cross-reference titles."""
    projects = {}
    for path, text in texts.items():
        root, _, rel = path.partition("/_sources/") if "/_sources/" in path else ("", "", path)
        page = re.sub(r"(\.rst)?\.txt$", "", rel)
        projects.setdefault(root, {})[page if page.endswith(".rst") else page + ".rst"] = (path, text)
    result = {}
    substitutions = SUBSTITUTIONS if package.startswith("python3.") else {}
    for pages in projects.values():
        ctx = Context(*collect_titles({page: text for page, (_, text) in pages.items()}))
        for page, (path, text) in sorted(pages.items()):
            result[path] = page_documents(page, text, ctx, args, substitutions, DocRenderer)
    return result


def package_documents(pkg: dict, args):
    """``[(path, title, text)]`` of one package in path order, plus per-format file counts."""
    has_sources = any("/_sources/" in path for path in pkg["texts"])
    exclude = EXCLUDES.get(pkg["package"])
    by_format = {"rst": {}, "pod": {}, "asciidoc": {}}
    for path, text in pkg["texts"].items():
        fmt = source_format(pkg["package"], path, has_sources)
        if fmt and not GENERIC_EXCLUDE.search(path) and not (exclude and re.search(exclude, path)):
            by_format[fmt][path] = text
    docs = rst_documents(by_format["rst"], pkg["package"], args) if by_format["rst"] else {}
    for path, items in (pod_items(by_format["pod"], args.max_code_lines) if by_format["pod"] else {}).items():
        docs[path] = item_documents(items, path, args)
    for path, text in by_format["asciidoc"].items():
        lines = [line.rstrip() for line in text.expandtabs(8).splitlines()]
        docs[path] = item_documents(asciidoc_items(lines, dict(ADOC_ATTRS), args.max_code_lines), path, args)
    counts = {fmt: len(files) for fmt, files in by_format.items() if files}
    return [(path, title, text) for path in sorted(docs) for title, text in docs[path]], counts


# ---- corpus assembly ----------------------------------------------------------------------------

def normalised(text: str) -> str:
    """Case-folded NFKC text with every run of non-word characters made one space."""
    return re.sub(r"\W+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


class Deduper:
    """Drops exact and near-exact duplicate documents (SHA-256 of the text, and of its
    ``normalised`` form) and boilerplate paragraphs: a paragraph (not the first, the title) whose
    normalised form has 20+ characters and already appeared in ``max_repeats`` kept documents
    ("Click here to download the full example code", "Part of the git(1) suite", ...). The first
    occurrence in package/path order is kept, so the result is deterministic."""

    def __init__(self, max_repeats: int, min_bytes: int):
        """``min_bytes``: a document left smaller than this by boilerplate removal is dropped."""
        self.max_repeats, self.min_bytes = max_repeats, min_bytes
        self.seen, self.paragraphs = set(), collections.Counter()
        self.counts = {"exact": 0, "near_exact": 0, "boilerplate_paragraphs": 0, "emptied_by_boilerplate": 0}

    def keep(self, text: str):
        """The text to keep (boilerplate removed), or None for a duplicate or an emptied document."""
        exact = "x" + hashlib.sha256(text.encode("utf-8")).hexdigest()
        near = "n" + hashlib.sha256(normalised(text).encode("utf-8")).hexdigest()
        if exact in self.seen or near in self.seen:
            self.counts["exact" if exact in self.seen else "near_exact"] += 1
            return None
        self.seen.update((exact, near))
        paragraphs = text.split("\n\n")
        kept = paragraphs[:1]
        for paragraph in paragraphs[1:]:
            key = normalised(paragraph)
            if len(key) >= 20:
                key = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
                self.paragraphs[key] += 1
                if self.paragraphs[key] > self.max_repeats:
                    self.counts["boilerplate_paragraphs"] += 1
                    continue
            kept.append(paragraph)
        text = "\n\n".join(kept)
        if len(kept) < len(paragraphs) and len(text.encode("utf-8")) < self.min_bytes:
            self.counts["emptied_by_boilerplate"] += 1
            return None
        return text


def assemble(packages, args):
    """Records per split and the manifest's package entries, deduplicated in package/path order."""
    splits = {"train": [], "valid": [], "test": []}
    deduper, entries = Deduper(args.max_paragraph_repeats, args.min_prose_bytes), []
    for pkg in packages:
        started, before = time.time(), sum(deduper.counts.values())
        documents, counts = package_documents(pkg, args)
        entry = {k: pkg[k] for k in ("package", "version", "file", "sha256", "bytes", "licence")}
        entry.update(files=counts, documents={s: 0 for s in splits}, text_bytes={s: 0 for s in splits})
        for path, title, text in documents:
            text = deduper.keep(text)
            if text is None:
                continue
            source = re.sub(r"^usr/share/doc/[^/]+/", "", path)
            split = split_of(f"{pkg['package']}\n{source}", title, SPLITS)
            splits[split].append({"text": text, "package": pkg["package"], "source": source, "title": title})
            entry["documents"][split] += 1
            entry["text_bytes"][split] += len(text.encode("utf-8"))
        entry["dropped"] = sum(deduper.counts.values()) - before
        entries.append(entry)
        print(f"{pkg['package']} {pkg['version']}: {sum(entry['documents'].values())} documents, "
              f"{sum(entry['text_bytes'].values())} bytes of text, {entry['dropped']} duplicates and "
              f"boilerplate paragraphs dropped, files {counts} ({time.time() - started:.1f} s)", flush=True)
    return splits, entries, deduper.counts


def count_tokens(splits, spm_model):
    """``(method, {split: tokens})``: SentencePiece token counts if the model exists, else bytes/4."""
    if not (spm_model and os.path.isfile(spm_model)):
        return "estimate: UTF-8 bytes / 4", {n: sum(len(r["text"].encode("utf-8")) for r in rs) // 4
                                              for n, rs in splits.items()}
    import sentencepiece
    sp = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    with open(spm_model, "rb") as f:
        method = f"sentencepiece {os.path.basename(spm_model)} sha256 {hashlib.sha256(f.read()).hexdigest()}"
    return method, {name: sum(len(ids) for k in range(0, len(records), 256)
                              for ids in sp.encode([r["text"] for r in records[k:k + 256]]))
                    for name, records in splits.items()}


def write_outputs(splits, entries, dropped, args):
    """Write {train,valid,test}.jsonl and manifest.json (no timestamps: byte-identical reruns)."""
    os.makedirs(args.output_dir, exist_ok=True)
    method, tokens = count_tokens(splits, args.spm_model)
    totals = {}
    for name, records in splits.items():
        path = os.path.join(args.output_dir, f"{name}.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        os.replace(path + ".tmp", path)
        totals[name] = {"documents": len(records), "file_bytes": os.path.getsize(path),
                        "text_bytes": sum(len(r["text"].encode("utf-8")) for r in records),
                        "tokens": tokens[name]}
        print(f"{name}: {len(records)} documents, {totals[name]['file_bytes']} bytes "
              f"({totals[name]['text_bytes']} bytes of text, {tokens[name]} tokens: {method}) -> {path}")
    options = {k: getattr(args, k) for k in ("max_code_lines", "min_doc_bytes", "max_doc_bytes",
                                             "min_prose_bytes", "max_paragraph_repeats")}
    manifest = {"builder": "tools/build_large_corpus.py", "options": options, "packages": entries,
                "splits": totals, "dropped": dropped, "token_count_method": method,
                "split_rule": "sha256(package \\n path \\n title) % 10000: 0-99 valid, 100-199 test"}
    with open(os.path.join(args.output_dir, "manifest.json"), "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    print(f"total: {sum(t['documents'] for t in totals.values())} documents, "
          f"{sum(t['text_bytes'] for t in totals.values())} bytes of text, {sum(tokens.values())} "
          f"tokens ({method}); dropped: {dropped}")


def download(names, cache_dir: str):
    """``apt-get download`` each package into ``cache_dir`` (a .deb already there is reused)."""
    os.makedirs(cache_dir, exist_ok=True)
    paths = []
    for name in names:
        pattern = os.path.join(glob.escape(cache_dir), f"{glob.escape(name)}_*.deb")
        if not glob.glob(pattern):
            subprocess.run(["apt-get", "download", name], cwd=cache_dir, check=True)
        if len(glob.glob(pattern)) != 1:
            raise SystemExit(f"build_large_corpus.py: error: want one {pattern}, have {glob.glob(pattern)}")
        paths += glob.glob(pattern)
    return paths


def main(argv=None):
    """Command line: read the packages, build, write; see ``--help``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="example: python "
                                "tools/build_large_corpus.py --download  (see data/LARGE_CORPUS.md)")
    p.add_argument("inputs", nargs="*", help=".deb files or unpacked package trees (with DEBIAN/control)")
    p.add_argument("--download", action="store_true",
                   help="apt-get download --packages into --cache-dir and build from those too")
    p.add_argument("--packages", nargs="+", default=sorted(DEFAULT_PACKAGES), help="for --download")
    p.add_argument("--cache-dir", default="data/large_corpus/debs")
    p.add_argument("--output-dir", default="data/large_corpus")
    p.add_argument("--spm-model", default="data/processed/spm.model",
                   help="SentencePiece model to count tokens with, if it exists (else bytes/4)")
    p.add_argument("--max-code-lines", type=int, default=40, help="drop code blocks longer than this")
    p.add_argument("--min-doc-bytes", type=int, default=1000)
    p.add_argument("--max-doc-bytes", type=int, default=20000)
    p.add_argument("--min-prose-bytes", type=int, default=300, help="drop documents with less prose")
    p.add_argument("--max-paragraph-repeats", type=int, default=3,
                   help="drop a paragraph (20+ characters) after it has appeared in this many documents")
    args = p.parse_args(argv)
    inputs = list(args.inputs) + (download(args.packages, args.cache_dir) if args.download else [])
    if not inputs:
        p.error("give .deb files / package trees, or --download")
    started = time.time()
    packages = sorted((read_package(path) for path in inputs), key=lambda x: (x["package"], x["version"]))
    for a, b in zip(packages, packages[1:]):
        if a["package"] == b["package"]:
            raise SystemExit(f"build_large_corpus.py: error: {a['package']} given twice ({a['file']}, {b['file']})")
    splits, entries, dropped = assemble(packages, args)
    write_outputs(splits, entries, dropped, args)
    print(f"built in {time.time() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())

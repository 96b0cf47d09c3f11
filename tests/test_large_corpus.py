"""tools/build_large_corpus.py on tiny fake Debian packages (a reST page, a POD file, an AsciiDoc
file), as unpacked trees and, where dpkg-deb exists, as .deb files: deterministic bytes, markup
stripped, duplicates dropped, manifest contents, and splits that do not move when a document is
added. Runs in seconds, without the real packages."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import build_large_corpus as blc  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("perl") is None, reason="POD rendering needs perl")

SHARED_SECTION = """Shared section
==============

This section is shipped, word for word, by two packages. The builder must keep only one copy of it,
the one that comes first in package and path order, and count the other as a duplicate.
"""
RST_PAGE = """Fake guide
##########

.. automodule:: fake.module
   :members:

Getting started
===============

Call :func:`len` on a :class:`list` to count its items; see :ref:`other-label` for more. The
``--verbose`` flag prints *every* step of the build to the terminal.

.. code-block:: python

   print(len([1, 2, 3]))

.. _other-label:

Reference
=========

.. note:: Notes keep their text with a label, as in the Python documentation corpus.

Every option has a default that suits most builds, and the documentation explains each of them.

""" + SHARED_SECTION
POD_FILE = """=head1 NAME

fakepod - a fake module documented in POD

=head1 DESCRIPTION

B<fakepod> turns C<$input> into output; see L<perlfunc/open> and I<never> look back. The module has
no dependencies and works on every platform that Perl supports.

=over 4

=item verbose

Print what happens while it happens, one line per step of the work.

=back

    my $x = fakepod->new(verbose => 1);
    $x->run;

=head1 SEE ALSO

The perlpod manual page describes this markup language in much more detail than this file does.

=cut
"""
ADOC_FILE = """git-fake(1)
===========

NAME
----
git-fake - Pretend to do something useful with a repository

DESCRIPTION
-----------
:fake-attr: ignored
This command updates nothing, but its manual page reads like the real ones. See
linkgit:git-commit[1] and 'git add' for commands that do real work, and use `git fake {litdd}dry-run`
to be extra careful. Read <<options,the options>> first.

[[options]]
OPTIONS
-------
-n::
--dry-run::
	Do not actually fake anything; just show what would be faked, with *all* the details.

------------
$ git fake --dry-run
faked nothing
------------

NOTE: This is a note about the command, long enough to be a paragraph of its own here.

// a comment line that must not appear in the corpus
"""
OTHER_PAGE = """Other project
=============

Introduction
------------

The other package documents a different project, in prose that no other package repeats anywhere.
It exists to check that documents from two packages are merged into one corpus.

""" + SHARED_SECTION.replace("is shipped, word", "is  shipped,\nword").upper().replace("=", "-")


def make_tree(root, name, version, files):
    """A package tree (DEBIAN/control plus files), as ``dpkg-deb --build`` takes it."""
    os.makedirs(os.path.join(root, "DEBIAN"))
    with open(os.path.join(root, "DEBIAN", "control"), "w") as f:
        f.write(f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: Nobody "
                f"<nobody@example.com>\nDescription: fake documentation\n")
    for rel, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "w", encoding="utf-8") as f:
            f.write(text)
    return str(root)


@pytest.fixture
def trees(tmp_path):
    """Two fake packages: fake-doc (reST, POD, AsciiDoc, a changelog) and other-doc (reST with a
    near-exact copy of one of fake-doc's sections)."""
    fake = make_tree(tmp_path / "fake", "fake-doc", "1.0-1", {
        "usr/share/doc/fake-doc/html/_sources/guide.rst.txt": RST_PAGE,
        "usr/share/doc/fake-doc/html/_sources/changelog.rst.txt": "Changes\n=======\n\nFixed bug 1.\n" * 9,
        "usr/share/perl/5.36.0/pod/fakepod.pod": POD_FILE,
        "usr/share/doc/fake-doc/git-fake.adoc": ADOC_FILE,
    })
    other = make_tree(tmp_path / "other", "other-doc", "2:3.4-5", {
        "usr/share/doc/other-doc/html/_sources/index.rst.txt": OTHER_PAGE,
    })
    return fake, other


SMALL = ["--min-doc-bytes", "200", "--max-doc-bytes", "3000", "--min-prose-bytes", "40", "--spm-model", ""]


def build(inputs, out):
    """Run the builder (small document sizes, bytes/4 token estimate); the splits and manifest."""
    blc.main([*inputs, "--output-dir", str(out), *SMALL])
    docs = {}
    for split in ("train", "valid", "test"):
        with open(os.path.join(out, f"{split}.jsonl"), encoding="utf-8") as f:
            docs[split] = [json.loads(line) for line in f]
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        return docs, json.load(f)


def read_bytes(out):
    """Every output file's bytes, by name."""
    return {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))}


def test_deterministic_and_markup_stripped(trees, tmp_path):
    docs, _ = build(trees, tmp_path / "a")
    build(trees[::-1], tmp_path / "b")
    assert read_bytes(tmp_path / "a") == read_bytes(tmp_path / "b")
    text = "\n".join(d["text"] for split in docs.values() for d in split)
    for markup in ("=head1", "=item", ":func:", ":class:", "linkgit:", "B<", "C<", "L<", "{litdd}",
                   "automodule", ".. note", "``", "<<options", "[[options]]", "a comment line",
                   ":fake-attr:", "Fixed bug 1."):
        assert markup not in text, markup
    for rendered in ("Call len() on a list", "see Reference for more", "print(len([1, 2, 3]))",
                     "Note: Notes keep their text",
                     "fakepod turns $input into output; see \"open\" in perlfunc and never look back",
                     "my $x = fakepod->new(verbose => 1);", "git-commit(1) and git add",
                     "git fake --dry-run to be extra careful", "Read the options first",
                     "-n, --dry-run:", "Do not actually fake anything", "$ git fake --dry-run",
                     "Note: This is a note"):
        assert rendered in text, rendered


def test_duplicates_removed(trees, tmp_path):
    docs, manifest = build(trees, tmp_path / "out")
    records = [d for split in docs.values() for d in split]
    shared = [d for d in records if "word for word" in d["text"].lower()]
    assert len(shared) == 1 and shared[0]["package"] == "fake-doc"  # the first in package order
    assert manifest["dropped"]["near_exact"] == 1  # the copy differs in case and whitespace only
    assert len({d["text"] for d in records}) == len(records)


def test_manifest_names_packages_and_versions(trees, tmp_path):
    docs, manifest = build(trees, tmp_path / "out")
    packages = {p["package"]: p for p in manifest["packages"]}
    assert list(packages) == ["fake-doc", "other-doc"]
    assert packages["fake-doc"]["version"] == "1.0-1" and packages["other-doc"]["version"] == "2:3.4-5"
    assert packages["fake-doc"]["files"] == {"rst": 1, "pod": 1, "asciidoc": 1}  # changelog excluded
    assert len(packages["fake-doc"]["sha256"]) == 64 and packages["fake-doc"]["licence"]
    for split, records in docs.items():
        assert manifest["splits"][split]["documents"] == len(records)
        assert manifest["splits"][split]["tokens"] == manifest["splits"][split]["text_bytes"] // 4
    assert manifest["options"]["max_code_lines"] == 40


def test_split_is_stable_when_a_document_is_added(trees, tmp_path, monkeypatch):
    monkeypatch.setattr(blc, "SPLITS", (("valid", 3000), ("test", 3000)))  # spread 10 documents out
    before, _ = build(trees, tmp_path / "a")
    extra = os.path.join(trees[1], "usr/share/doc/other-doc/html/_sources/added.rst.txt")
    with open(extra, "w") as f:
        f.write("Added page\n==========\n\nA new page about something else entirely, added later.\n")
    after, _ = build(trees, tmp_path / "b")
    where = {(d["package"], d["source"], d["title"]): s for s, records in after.items() for d in records}
    old = {(d["package"], d["source"], d["title"]): s for s, records in before.items() for d in records}
    assert len(where) == len(old) + 1 and {k: where[k] for k in old} == old
    assert len({s for s in old.values()}) == 3  # all three splits used, so the check means something


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb to build a .deb")
def test_deb_input_matches_tree_input(trees, tmp_path):
    debs = []
    for tree in trees:
        debs.append(str(tmp_path / (os.path.basename(tree) + ".deb")))
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", tree, debs[-1]],
                       check=True, capture_output=True)
    _, manifest = build(debs, tmp_path / "from-deb")
    build(trees, tmp_path / "from-tree")
    deb_files, tree_files = read_bytes(tmp_path / "from-deb"), read_bytes(tmp_path / "from-tree")
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl"):
        assert deb_files[name] == tree_files[name]
    assert [p["file"] for p in manifest["packages"]] == ["fake.deb", "other.deb"]
    with open(debs[0], "rb") as f:
        assert manifest["packages"][0]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    cache = tmp_path / "cache"  # --download reuses the .deb files already in its cache
    cache.mkdir()
    shutil.copy(debs[0], cache / "fake-doc_1.0-1_all.deb")
    shutil.copy(debs[1], cache / "other-doc_2%3a3.4-5_all.deb")
    blc.main(["--download", "--packages", "other-doc", "fake-doc", "--cache-dir", str(cache),
              "--output-dir", str(tmp_path / "from-cache"), *SMALL])
    assert read_bytes(tmp_path / "from-cache")["train.jsonl"] == tree_files["train.jsonl"]


def test_asciidoc_items():
    lines = ["Title", "=====", "", "[verse]", "'git x' {litdd}y", "", "* first *item*", "* second",
             "", "|===", "|a |b", "|===", "", "////", "hidden", "////"]
    assert blc.asciidoc_items(lines, dict(blc.ADOC_ATTRS), 40) == [
        ("title", "Title", 0), ("code", "'git x' --y", 0), ("prose", "- first item", 0),
        ("prose", "- second", 0), ("prose", "a | b", 0)]


def test_help_has_an_example():
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "build_large_corpus.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--download" in out and "example:" in out

"""tools/build_mt_corpus.py: reading .mo catalogues, every cleaning rule, de-duplication, the split
guarantee (no English sentence in two splits), determinism, bad inputs, the bundled data/mt/, and
train_tokenizer's --user-defined-symbols keeping a language tag one piece.

The catalogues are written by the test itself (``write_mo``, a pure-Python writer of the GNU .mo
format), so no msgfmt is needed."""
import collections
import gettext
import json
import os
import shutil
import struct
import subprocess

import pytest

from stablemoe_megatron.cli import build_mt_corpus as mt
from stablemoe_megatron.cli import train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = os.path.join(REPO, "data", "mt")
HEADER = "Content-Type: text/plain; charset={charset}\nPlural-Forms: nplurals=2; plural=(n > 1);\n"


def mo_bytes(items):
    """The bytes of a little-endian GNU .mo file holding the encoded ``[(msgid, msgstr)]``."""
    n, blob, tables = len(items), b"", [b"", b""]
    data_at = 28 + 16 * n
    for column in (0, 1):
        for item in items:
            tables[column] += struct.pack("<2I", len(item[column]), data_at + len(blob))
            blob += item[column] + b"\0"
    return struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0) + tables[0] + tables[1] + blob


def write_mo(path, entries, charset="utf-8", header_extra=""):
    """Write a .mo file: a header entry, then ``entries`` ``[(msgid, msgstr)]``; a plural entry is
    ``((singular, plural), [forms])``, a context ``"ctx\\x04msgid"``."""
    items = [(b"", (HEADER.format(charset=charset) + header_extra).encode(charset))]
    for msgid, msgstr in entries:
        msgid = "\0".join(msgid) if isinstance(msgid, tuple) else msgid
        msgstr = "\0".join(msgstr) if isinstance(msgstr, list) else msgstr
        items.append((msgid.encode(charset), msgstr.encode(charset)))
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(mo_bytes(sorted(items)))


def build(tmp_path, locale_dir, name="out", *extra):
    out = tmp_path / name
    mt.main(["--locale-dir", str(locale_dir), "--output", str(out), *extra])
    return out


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def all_records(out):
    return {split: read_jsonl(os.path.join(out, f"{split}.jsonl")) for split in mt.SPLITS}


def pairs_of(out, lang):
    """{(translation, english)} of ``lang`` over all splits, the language tag checked and removed."""
    found = set()
    for records in all_records(out).values():
        for r in records:
            if r["lang"] == lang:
                assert r["src"].startswith(f"<{lang}> ")
                found.add((r["src"][len(lang) + 3:], r["tgt"]))
    return found


def exit_message(capsys, argv):
    """The error line of a run that must exit with code 2."""
    with pytest.raises(SystemExit) as exc:
        mt.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


# ---- reading .mo files ----------------------------------------------------------------------------

def test_read_mo_agrees_with_gettext(tmp_path):
    path = tmp_path / "a.mo"
    write_mo(path, [("Open the file", "Ouvrir le fichier"), ("menu\x04Recent files", "Fichiers récents"),
                    (("One file", "Many files"), ["Un fichier", "Des fichiers"]), ("Later", "")])
    ours, undecodable = mt.read_mo(str(path))
    with open(path, "rb") as f:
        catalog = gettext.GNUTranslations(f)._catalog
    reference = {(k[0] if isinstance(k, tuple) else k).split("\x04")[-1]: v
                 for k, v in catalog.items() if not isinstance(k, tuple) or k[1] == 0}
    assert dict(ours) == reference and undecodable == 0
    assert ("One file", "Un fichier") in ours and ("Recent files", "Fichiers récents") in ours


def test_read_mo_latin1_header_that_gettext_cannot_read(tmp_path):
    path = tmp_path / "latin1.mo"
    write_mo(path, [("Delete the file", "Datei löschen")], charset="iso-8859-1",
             header_extra="Last-Translator: Jörg\n")
    with pytest.raises(UnicodeDecodeError), open(path, "rb") as f:
        gettext.GNUTranslations(f)  # decodes the header as UTF-8 before reading its charset
    assert ("Delete the file", "Datei löschen") in mt.read_mo(str(path))[0]


@pytest.mark.parametrize("damage, why", [
    (lambda b: b"\0\0\0\0" + b[4:], "bad magic number"),
    (lambda b: b[:60], "past the end of the file"),
    (lambda b: b[:10], "shorter than the 20-byte header"),
])
def test_corrupt_mo_names_the_file(tmp_path, capsys, damage, why):
    path = tmp_path / "loc" / "fr" / "LC_MESSAGES" / "broken.mo"
    write_mo(path, [("Open the file", "Ouvrir le fichier")] * 3)
    path.write_bytes(damage(path.read_bytes()))
    err = exit_message(capsys, ["--locale-dir", str(tmp_path / "loc"), "--output", str(tmp_path / "o")])
    assert f"{path}: not a valid gettext .mo catalogue" in err and why in err


# ---- cleaning ---------------------------------------------------------------------------------------

KEPT = [  # (msgid, msgstr, kept English, kept translation)
    ("Open the file", "Ouvrir le fichier", "Open the file", "Ouvrir le fichier"),
    ("<b>Bold</b> text <span weight='bold'>here</span>", "Texte <i>gras</i> ici",
     "Bold text here", "Texte gras ici"),
    ("Save &amp; quit now", "Enregistrer &amp; quitter", "Save & quit now", "Enregistrer & quitter"),
    ("&Quit the program", "&Quitter le programme", "Quit the program", "Quitter le programme"),
    ("AT&T modem found", "Modem AT&T trouvé", "AT&T modem found", "Modem AT&T trouvé"),
    ("  Several\n spaces\there ", "Plusieurs\u00a0espaces\n ici", "Several spaces here", "Plusieurs espaces ici"),
    ("Current page view", "Vue de la page (_C)", "Current page view", "Vue de la page"),
    ("Preview the page", "Aperçu de la page (&P)", "Preview the page", "Aperçu de la page"),
    (("One file deleted", "Many files deleted"), ["Un fichier supprimé", "Des fichiers supprimés"],
     "One file deleted", "Un fichier supprimé"),
    ("menu\x04Recent files list", "Liste des fichiers récents", "Recent files list", "Liste des fichiers récents"),
]
DROPPED = [  # (msgid, msgstr, rule)
    ("Not yet translated", "", "empty"),
    ("Cannot open %s", "Impossible d'ouvrir %s", "placeholder"),
    ("Copied %1$s files", "%1$s fichiers copiés", "placeholder"),
    ("Saved %(name)s today", "%(name)s enregistré", "placeholder"),
    ("Saved {name} today", "{name} enregistré", "placeholder"),
    ("Done: {0} items", "Terminé : {0} éléments", "placeholder"),
    ("Set ${HOME} first", "Réglez ${HOME} d'abord", "placeholder"),
    ("Usage: run <file>", "Usage : run <fichier>", "placeholder"),
    ("Progress at 100%% now", "Progression à 100%% maintenant", "placeholder"),
    ("See https://example.org for help", "Voir https://example.org pour l'aide", "technical"),
    ("Write to bugs@example.org now", "Écrire à bugs@example.org", "technical"),
    ("Edit the /etc/hosts file", "Modifier le fichier /etc/hosts", "technical"),
    ("use --force to continue", "utilisez --force pour continuer", "technical"),
    ("set wal_level first", "réglez wal_level d'abord", "technical"),
    ("Print\\n the line", "Imprimer\\n la ligne", "technical"),
    ("2023 - 2024 ...", "2023 - 2024 !!", "non_letters"),
    ("Open", "Ouvrir", "too_short"),
    ("Go on", "X", "too_short"),
    (" ".join(["word"] * 61), " ".join(["mot"] * 61), "too_long"),
    ("Very long " + "a" * 200, "Très long " + "b" * 200, "too_long"),
    ("Accept EULA", "Accepter le contrat de licence utilisateur final du logiciel", "length_ratio"),
    ("Print Preview", "print preview", "untranslated"),
]
MNEMONIC = [  # a GTK-like catalogue: _ marks accelerators, mid-word too
    ("_File manager", "Gestionnaire de _fichiers", "File manager", "Gestionnaire de fichiers"),
    ("Page Set_up dialog", "Boîte de _mise en page", "Page Setup dialog", "Boîte de mise en page"),
    ("_Open the door", "Ou_vrir la porte", "Open the door", "Ouvrir la porte"),
]


@pytest.fixture(scope="module")
def cleaned(tmp_path_factory):
    """A corpus from fr catalogues holding one entry per rule, a mnemonic catalogue and a duplicate."""
    tmp = tmp_path_factory.mktemp("clean")
    loc = tmp / "loc" / "fr" / "LC_MESSAGES"
    write_mo(loc / "app.mo", [(m, s) for m, s, *_ in KEPT + DROPPED])
    write_mo(loc / "app-copy.mo", [("Open the file", "Ouvrir le fichier"), ("Open the file:", "Ouvrir le fichier :"),
                                   ("Open the File", "Ouvrir un fichier")])
    write_mo(loc / "gtk.mo", [(m, s) for m, s, *_ in MNEMONIC])
    write_mo(tmp / "loc" / "hi" / "LC_MESSAGES" / "gtk.mo", [("Image has zero height", "छवि की ऊंचाई शून्य है")])
    out = build(tmp, tmp / "loc", "out", "--min-eval-pairs", "0")
    return out, json.loads((out / "stats.json").read_text())


def test_every_cleaning_rule(cleaned):
    out, stats = cleaned
    expected = {(tr, en) for _, _, en, tr in KEPT + MNEMONIC} | {("Ouvrir un fichier", "Open the File")}
    assert pairs_of(out, "fr") == expected
    assert pairs_of(out, "hi") == {("छवि की ऊंचाई शून्य है", "Image has zero height")}  # marks count as letters
    rules = collections.Counter(rule for *_, rule in DROPPED)
    rules["empty"] += 4  # the header entry of each catalogue
    rules["duplicate"] = 2  # "Open the file" again, and "Open the file:" (the same sentence)
    assert {rule: sum(c.values()) for rule, c in stats["dropped"].items()} == rules


@pytest.mark.parametrize("msgid, msgstr, rule", DROPPED[1:])
def test_drop_rule_of_each_pair(msgid, msgstr, rule):
    args = mt.build_parser().parse_args(["--output", "unused"])
    assert mt.pair_rule(msgid, msgstr, args)[0] == rule


def test_mnemonics_detected_per_catalogue():
    assert mt.uses_mnemonics([(m, s) for m, s, *_ in MNEMONIC])
    assert not mt.uses_mnemonics([("set wal_level first", ""), ("_File", ""), ("a_b c_d", "")])


def test_duplicates_keep_the_most_frequent_surface_form(cleaned):
    out, _ = cleaned
    tgts = [r["tgt"] for records in all_records(out).values() for r in records if r["src"] == "<fr> Ouvrir le fichier"]
    assert tgts == ["Open the file"]  # 2 catalogues, vs "Open the file:" once


# ---- the split --------------------------------------------------------------------------------------

NAMES = ["red", "green", "blue", "black", "white", "brown", "grey", "pink", "gold", "silver"]


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    """fr (300 pairs), de (150, the same English as fr, a third upper-cased with a full stop) and lv
    (20, the same English as fr and de's upper-cased ones: topping lv up must move de's too)."""
    tmp = tmp_path_factory.mktemp("split")
    english = [f"Paint the {a} wall {b} times" for a in NAMES for b in ("one", "two", "six") * 10][:300]
    english = [f"{e} in room {chr(97 + i % 26)}{chr(97 + i // 26)}" for i, e in enumerate(english)]
    fr = [(e, f"Peindre le mur {e.split()[2]} {i} fois") for i, e in enumerate(english)]
    de = [(e.upper() + "." if i % 3 == 0 else e, f"Die Wand {i} streichen") for i, e in enumerate(english[::2])]
    lv = [(e, f"Krāsot sienu {i} reizes") for i, e in enumerate(english[0:120:6])]
    write_mo(tmp / "loc" / "fr" / "LC_MESSAGES" / "paint.mo", fr)
    write_mo(tmp / "loc" / "de_CH" / "LC_MESSAGES" / "paint.mo", de)  # a region variant counts as de
    write_mo(tmp / "loc" / "lv" / "LC_MESSAGES" / "paint.mo", lv)
    write_mo(tmp / "loc" / "fr@latin" / "LC_MESSAGES" / "paint.mo", [("Paint it black", "Peins-le en noir")])
    return tmp


def test_no_english_sentence_in_two_splits(split_dir, tmp_path):
    out = build(tmp_path, split_dir / "loc", "out", "--valid-fraction", "0.1", "--test-fraction", "0.1",
                "--min-eval-pairs", "5", "--languages", "fr", "de", "lv")
    records = all_records(out)
    split_of = {}
    for split, rows in records.items():
        for r in rows:
            assert split_of.setdefault(mt.normalise(r["tgt"]), split) == split, r
    assert sum(map(len, records.values())) == 300 + 150 + 20  # fr@latin (a modifier variant) not read
    stats = json.loads((out / "stats.json").read_text())
    for lang in ("fr", "de", "lv"):
        assert min(stats["pairs"][lang].values()) >= 5, stats["pairs"]  # lv topped up to 5
    shared = {mt.normalise(r["tgt"]) for rows in records.values() for r in rows if r["lang"] == "de"}
    assert shared <= {mt.normalise(r["tgt"]) for rows in records.values() for r in rows if r["lang"] == "fr"}
    assert {r["lang"] for rows in records.values() for r in rows} == {"fr", "de", "lv"}


def test_split_follows_the_english_hash(split_dir, tmp_path):
    out = build(tmp_path, split_dir / "loc", "out", "--valid-fraction", "0.1", "--test-fraction", "0.1",
                "--min-eval-pairs", "0", "--languages", "fr")
    for split, rows in all_records(out).items():
        for r in rows:
            h = mt.english_hash(r["tgt"])
            assert split == ("test" if h < 0.1 else "valid" if h < 0.2 else "train")
    assert all(rows for rows in all_records(out).values())


def test_deterministic_and_train_cap(split_dir, tmp_path):
    flags = ["--valid-fraction", "0.1", "--test-fraction", "0.1", "--min-eval-pairs", "3"]
    first = build(tmp_path, split_dir / "loc", "a", *flags, "--max-pairs-per-language", "50")
    second = build(tmp_path, split_dir / "loc", "b", *flags, "--max-pairs-per-language", "50")
    for name in mt.OUTPUT_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    full = build(tmp_path, split_dir / "loc", "c", *flags)
    capped, uncapped = (json.loads((d / "stats.json").read_text())["pairs"] for d in (first, full))
    assert capped["fr"]["train"] == capped["de"]["train"] == 50 and capped["lv"]["train"] == uncapped["lv"]["train"]
    for lang in ("fr", "de", "lv"):  # valid/test untouched by the train cap
        assert (capped[lang]["valid"], capped[lang]["test"]) == (uncapped[lang]["valid"], uncapped[lang]["test"])
    other = build(tmp_path, split_dir / "loc", "d", *flags, "--max-pairs-per-language", "50", "--seed", "7")
    assert (other / "train.jsonl").read_bytes() != (first / "train.jsonl").read_bytes()


# ---- bad inputs -------------------------------------------------------------------------------------

def test_output_not_empty_needs_overwrite(split_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("keep me")
    argv = ["--locale-dir", str(split_dir / "loc"), "--output", str(out), "--min-eval-pairs", "0"]
    err = exit_message(capsys, argv)
    assert f"--output {out}: directory is not empty; pass --overwrite" in err
    mt.main(argv + ["--overwrite"])
    assert (out / "README.md").read_text() == "keep me" and (out / "train.jsonl").stat().st_size > 0


def test_no_catalogue_of_the_languages(split_dir, tmp_path, capsys):
    err = exit_message(capsys, ["--locale-dir", str(split_dir / "loc"), "--output", str(tmp_path / "o"),
                                "--languages", "hi", "tr"])
    assert f"no .mo catalogue of --languages hi tr found in --locale-dir {split_dir / 'loc'}" in err


def test_missing_packages(tmp_path, capsys):
    if not shutil.which("dpkg-query") or subprocess.run(["dpkg-query", "-W", "sed"], capture_output=True).returncode:
        pytest.skip("needs dpkg with the sed package")
    err = exit_message(capsys, ["--packages", "no-such-package-x", "--output", str(tmp_path / "o")])
    assert ("none of --packages is installed (no-such-package-x); install them with "
            "`apt-get install no-such-package-x`") in err
    mt.main(["--packages", "no-such-package-x", "sed", "--languages", "fr", "de", "--output", str(tmp_path / "p"),
             "--min-eval-pairs", "0"])
    err = capsys.readouterr().err
    assert err.count("not installed") == 1
    assert ("package no-such-package-x is not installed; skipped "
            "(install it with `apt-get install no-such-package-x`)") in err
    stats = json.loads((tmp_path / "p" / "stats.json").read_text())
    assert stats["packages_not_installed"] == ["no-such-package-x"]
    assert {c["origin"] for c in stats["catalogues"]} == {"sed"} and stats["totals"]["train"] > 0


# ---- the bundled corpus and the tokenizer -------------------------------------------------------------

def test_bundled_corpus():
    if not os.path.isdir(BUNDLED):
        pytest.skip("data/mt/ not built")
    records = all_records(BUNDLED)
    stats = json.load(open(os.path.join(BUNDLED, "stats.json"), encoding="utf-8"))
    split_of = {}
    for split, rows in records.items():
        counts = collections.Counter(r["lang"] for r in rows)
        assert {lang: counts[lang] for lang in mt.LANGUAGES} == {lang: stats["pairs"][lang][split]
                                                                 for lang in mt.LANGUAGES}
        for r in rows:
            assert r["src"].startswith(f"<{r['lang']}> ") and r["tgt"]
            assert split_of.setdefault(mt.normalise(r["tgt"]), split) == split
    assert all(min(stats["pairs"][lang].values()) >= 100 for lang in mt.LANGUAGES)


def test_user_defined_symbols_keep_the_language_tag_one_piece(split_dir, tmp_path):
    spm = pytest.importorskip("sentencepiece")
    out = build(tmp_path, split_dir / "loc", "out", "--min-eval-pairs", "0")
    pieces = {}
    for name, extra in (("plain", []), ("tags", ["--user-defined-symbols", "<fr>", "<de>", "<lv>"])):
        train_tokenizer.main(["--input", str(out / "train.jsonl"), "--json-keys", "src", "tgt",
                              "--model-prefix", str(tmp_path / name), "--vocab-size", "400", *extra])
        model = spm.SentencePieceProcessor(model_file=str(tmp_path / f"{name}.model"))
        pieces[name] = model.encode("<fr> Peindre le mur", out_type=str)
        assert model.decode(model.encode("<fr> Peindre le mur")) == "<fr> Peindre le mur"
    assert "<fr>" in pieces["tags"] and "<fr>" not in pieces["plain"]

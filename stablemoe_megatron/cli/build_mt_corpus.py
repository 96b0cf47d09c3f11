"""Build an X->English parallel corpus from the gettext catalogues (.mo) of installed Debian packages.

A compiled catalogue ``<lang>/LC_MESSAGES/<domain>.mo`` maps English messages (msgid) to their
translations (msgstr). This tool reads the catalogues of nine languages (``LANGUAGES``: the WMT
languages of the StableMoE paper), cleans and de-duplicates the pairs, splits them into
train/valid/test without letting an English sentence cross splits, and writes
``{train,valid,test}.jsonl`` (``{"lang": "fr", "src": "<fr> Ouvrir le fichier", "tgt": "Open the
file"}`` per line) and ``stats.json``. Nothing is downloaded.

Inputs. ``--packages`` (default ``DEFAULT_PACKAGES``, the packages owning catalogues of these
languages on Debian 12) are listed with ``dpkg-query -L``; a package that is not installed is
reported with its ``apt-get install`` fix and skipped. ``--locale-dir DIR`` reads the catalogues
under DIR instead (``DIR/<lang>/LC_MESSAGES/*.mo``, like /usr/share/locale). A catalogue path
counts for language ``xx`` when it matches ``.../xx[_RR][.charset]/LC_MESSAGES/*.mo``: region
variants (de_CH, ro_MD) count as their language, charset variants (vim's cs.cp1250) too (decoded
with their own charset; the duplicates go in de-duplication); ``@modifier`` variants (a different
script or orthography, e.g. sr@latin) are not read. Plural entries give their singular msgid with
msgstr[0]; a msgctxt is dropped. The .mo reader is our own (``read_mo``), not
``gettext.GNUTranslations``, which decodes the catalogue header as UTF-8 before reading its charset
and fails on Latin-1 headers (vim's fr and cs catalogues, net-tools' de).

Cleaning, in this order (each drop is counted under its rule's name in stats.json):

* ``undecodable``: an entry that is not valid in its catalogue's charset (none on Debian 12).
* ``empty``: an empty msgstr, or the header entry (empty msgid). Fuzzy entries never reach a .mo.
* text clean-up on both sides, nothing dropped: Pango/HTML markup tags (``<b>``, ``</a>``,
  ``<span ...>``; only the known tag names of ``MARKUP_TAGS``) are removed keeping their text;
  accelerators are removed: "File (_F)" / "(&F)" suffix forms; a word-initial ``&`` before a
  letter that is not an entity ("&File", not "AT&T"); in a catalogue that marks accelerators with
  ``_`` (``uses_mnemonics``: GTK's), a text's single ``_`` before a letter or digit ("_File",
  "O_pen"; elsewhere a ``_`` is part of an identifier, "wal_level", and stays); then entities
  are decoded (``&amp;`` -> ``&``) and every whitespace run (newlines included) becomes one space.
* ``placeholder``: a format placeholder left on either side (``%s``, ``%d``, ``%1$s``, ``%(name)s``,
  ``%%``, ``{0}``, ``{name}``, ``${var}``, ``$var``, ``<file>``-style metavariables). The pair is
  dropped rather than stripped: stripping leaves broken sentences ("Cannot open : ").
* ``technical``: URLs, e-mail addresses, file paths, command-line options (``-a``, ``--all``),
  backslash escapes and commands, any ``_`` left after clean-up (identifiers), on either side:
  command-line help and code, not sentences.
* ``non_letters``: under half of the non-space characters are letters (Unicode L* or M*,
  so Devanagari vowel signs count) on either side.
* ``too_short``: English under ``--min-words`` (2) words (single words are dictionary entries,
  ambiguous without context), or a translation under 2 characters.
* ``too_long``: either side over ``--max-chars`` (200) characters or ``--max-words`` (60) words.
* ``length_ratio``: the longer side has over ``--max-ratio`` (3) times the characters of the other.
* ``untranslated``: the translation equals the English (after ``normalise``).

De-duplication (counted as ``duplicate``): pairs are grouped by (language, normalised English,
normalised translation) (``normalise``: NFKC, case-folded, punctuation runs as one space); one
pair per group is kept, its most frequent surface form (ties: the smallest string), so the same
catalogue shipped twice, and "Open file" / "Open file:" / "Open File" with the same translation,
count once. Distinct translations of one English sentence are all kept:
in the X->English direction they are different source sentences with the same correct target.

Split. The unit is the normalised English text, across all languages: a group goes to test if
``sha1(english)`` as a fraction of 2**160 is below ``--test-fraction``, to valid if below
``--test-fraction + --valid-fraction``, else to train. So no English sentence (nor a case or
punctuation variant of it) is in two splits, also when it is translated into several languages,
and the hash split of a sentence never depends on the other pairs. A language with fewer than
``--min-eval-pairs`` valid (or test) pairs gets more: its train groups with the smallest hashes
move to that split (with all their languages) until it has them. ``--max-eval-pairs-per-language``
and ``--max-pairs-per-language`` then cap valid/test and train by a seeded sample per language
(``--seed``); capped pairs are dropped, never moved to another split.

Output. ``src`` starts with the language tag ``<xx>`` and one space (``language_tag``); give the
tags to the tokenizer as user-defined symbols (``train_tokenizer --user-defined-symbols``) so each
stays one piece. Lines are ordered by sha1 of (lang, src, tgt), so languages are mixed. Same inputs
and flags give byte-identical files; stats.json records pairs per language and split, clean pairs
per language (before the caps), drops per rule and language, the catalogues read (with their
entries and the pairs each kept before de-duplication) and the flags. An existing non-empty
``--output`` is refused unless ``--overwrite`` is given (which replaces only the four files this
tool writes).
"""
import argparse
import collections
import hashlib
import html
import json
import os
import random
import re
import struct
import subprocess
import sys
import unicodedata
from typing import Dict, List, Optional, Sequence, Tuple

from stablemoe_megatron.errors import ConfigError

PROG = "build_mt_corpus"
LANGUAGES = ("fr", "cs", "de", "fi", "lv", "et", "ro", "hi", "tr")
SPLITS = ("train", "valid", "test")
OUTPUT_FILES = ("train.jsonl", "valid.jsonl", "test.jsonl", "stats.json")
# The packages owning catalogues of LANGUAGES on Debian 12 (dpkg -S /usr/share/locale/<lang>/
# LC_MESSAGES/*.mo, plus vim-runtime's /usr/share/vim/vim90/lang/<lang>/LC_MESSAGES/vim.mo).
DEFAULT_PACKAGES = tuple("""adduser apt appstream at-spi2-common bash binutils-common coreutils
    diffutils dpkg findutils gettext gettext-base git gnupg-l10n grep gsettings-desktop-schemas
    iso-codes krb5-locales libapt-pkg6.0 libavahi-common-data libc-l10n libdpkg-perl libelf1
    libgdk-pixbuf2.0-common libglib2.0-data libgnutls30 libgstreamer1.0-0 libgtk2.0-common libidn2-0
    libpam-runtime libpq5 login make man-db net-tools packagekit polkitd postgresql-15
    postgresql-client-15 procps psmisc python-apt-common sed shared-mime-info software-properties-common
    systemd tar vim-runtime wget xdg-user-dirs xkb-data xz-utils""".split())
RULES = ("undecodable", "empty", "placeholder", "technical", "non_letters", "too_short", "too_long",
         "length_ratio", "untranslated", "duplicate")
MO_PATH_RE = re.compile(r"/(?P<lang>[a-z]{2,3})(?:_[A-Z]{2})?(?:\.[\w-]+)?/LC_MESSAGES/[^/]+\.mo$")
MARKUP_TAGS = tuple("a b big br code div em i li markup p pre s small span strong sub sup tt u ul".split())
MARKUP_RE = re.compile(r"</?(?:%s)(?:\s[^<>]*)?/?>" % "|".join(MARKUP_TAGS), re.I)  # <b>, </a>, <br/>
ACCEL_SUFFIX_RE = re.compile(r"\s*\((?:_|&)[^\W_]\)")
AMP_ACCEL_RE = re.compile(r"(?<!\w)&(?=[^\W\d_])(?![A-Za-z]+;)")
WORD_START_MNEMONIC_RE = re.compile(r"(?<!\w)_[^\W_]")
PLACEHOLDER_RE = re.compile(
    r"%(?:\d+\$)?[-+#0']*(?:\*|\d+)?(?:\.(?:\*|\d+))?(?:hh|h|ll|l|L|q|j|z|t|I)?[diouxXeEfFgGaAcCsSpnm%]"
    r"|%\(\w+\)|%\d|\{[\w.\[\]:!#,-]*\}|\$\{?\w+\}?|<[^<>\s]+>")
TECHNICAL_RE = re.compile(r"\w+://|\bwww\.|[\w.+-]+@[\w-]+\.\w|(?:^|[\s(\"'])(?:~|\.{1,2})?/\w"
                          r"|(?:^|[\s(\[\"'])--?[A-Za-z]|_|\b\w+\.(?:c|h|py|sh|conf|txt|so)\b|\\\w")


def language_tag(lang: str) -> str:
    """The token that starts every source sentence of ``lang``: ``"<fr>"``."""
    return f"<{lang}>"


def normalise(text: str) -> str:
    """NFKC, case-folded text with every run of non-word characters made one space (the
    de-duplication and split key: "Open File..." and "open file" are the same sentence)."""
    return re.sub(r"[\W_]+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()


# ---- reading catalogues -------------------------------------------------------------------------

def _mo_error(path: str, why: str) -> ConfigError:
    return ConfigError(f"{path}: not a valid gettext .mo catalogue ({why}); remove it from the "
                       "input, or leave its package out of --packages")


def read_mo(path: str) -> Tuple[List[Tuple[str, str]], int]:
    """``([(msgid, msgstr)], undecodable)`` of a .mo file, in file order: the header (empty msgid)
    included, plural entries as (singular msgid, msgstr[0]), msgctxt removed; ``undecodable``
    counts entries not valid in the catalogue's charset. Raises ConfigError on a corrupt file."""
    with open(path, "rb") as f:
        buf = f.read()
    if len(buf) < 20:
        raise _mo_error(path, f"{len(buf)} bytes, shorter than the 20-byte header")
    order = {0x950412DE: "<", 0xDE120495: ">"}.get(struct.unpack("<I", buf[:4])[0])
    if order is None:
        raise _mo_error(path, "bad magic number")
    revision, count, ids_at, strs_at = struct.unpack(order + "4I", buf[4:20])
    if revision >> 16 not in (0, 1):
        raise _mo_error(path, f"unknown format revision {revision >> 16}")
    raw = []
    for i in range(count):
        entry = []
        for table in (ids_at, strs_at):
            if table + 8 * i + 8 > len(buf):
                raise _mo_error(path, "string table past the end of the file")
            length, offset = struct.unpack(order + "2I", buf[table + 8 * i:table + 8 * i + 8])
            if offset + length > len(buf):
                raise _mo_error(path, "string past the end of the file")
            entry.append(buf[offset:offset + length])
        raw.append(entry)
    header = next((s for m, s in raw if m == b""), b"").decode("latin-1")
    charset = re.search(r"charset=\s*([\w.:-]+)", header)
    charset = charset.group(1) if charset and charset.group(1).upper() != "CHARSET" else "utf-8"
    try:
        "".encode(charset)
    except LookupError:
        raise _mo_error(path, f"unknown charset {charset!r}") from None
    pairs, undecodable = [], 0
    for msgid, msgstr in raw:
        try:
            msgid = msgid.split(b"\0")[0].decode(charset).split("\x04")[-1]
            pairs.append((msgid, msgstr.split(b"\0")[0].decode(charset)))
        except UnicodeDecodeError:
            undecodable += 1
    return pairs, undecodable


def _catalogue_lang(path: str, languages: Sequence[str]) -> Optional[str]:
    match = MO_PATH_RE.search(path)
    return match.group("lang") if match and match.group("lang") in languages else None


def package_catalogues(packages: Sequence[str], languages: Sequence[str]):
    """``([(package, lang, path)], missing packages)``; prints one line per missing package."""
    found, missing = [], []
    for package in packages:
        try:
            run = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True)
        except FileNotFoundError:
            raise ConfigError("dpkg-query not found: --packages needs a Debian system; "
                              "pass --locale-dir DIR with the catalogues instead") from None
        if run.returncode != 0:
            missing.append(package)
            print(f"{PROG}: package {package} is not installed; skipped (install it with "
                  f"`apt-get install {package}`)", file=sys.stderr)
            continue
        for path in run.stdout.splitlines():
            lang = _catalogue_lang(path, languages)
            if lang and os.path.isfile(path):
                found.append((package, lang, path))
    if missing and len(missing) == len(packages):
        raise ConfigError(f"none of --packages is installed ({' '.join(missing)}); install them with "
                          f"`apt-get install {' '.join(missing)}`, or pass --locale-dir DIR")
    return sorted(set(found), key=lambda item: item[2]), missing


def directory_catalogues(locale_dir: str, languages: Sequence[str]):
    """``[(domain, lang, path)]`` of the catalogues under ``locale_dir``, sorted by path."""
    if not os.path.isdir(locale_dir):
        raise ConfigError(f"--locale-dir {locale_dir}: no such directory")
    found = []
    for root, dirs, names in os.walk(locale_dir):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            lang = _catalogue_lang("/" + os.path.relpath(path, locale_dir).replace(os.sep, "/"), languages)
            if lang:
                found.append((name[:-3], lang, path))
    return found


# ---- cleaning -----------------------------------------------------------------------------------

def uses_mnemonics(entries) -> bool:
    """Whether a catalogue marks accelerators with ``_``: at least half of its msgids holding a ``_``
    hold a single one at a word start ("_File"). True for GTK's (72 %), at most 17 % elsewhere
    (identifiers such as "wal_level")."""
    with_underscore = [msgid for msgid, _ in entries if "_" in msgid]
    mnemonic = [m for m in with_underscore if m.count("_") == 1 and WORD_START_MNEMONIC_RE.search(m)]
    return bool(with_underscore) and 2 * len(mnemonic) >= len(with_underscore)


def clean_text(text: str, mnemonics: bool = False) -> str:
    """Markup, accelerators and entities removed, whitespace runs made one space (see the module
    doc); ``mnemonics``: the catalogue marks accelerators with ``_`` (``uses_mnemonics``)."""
    text = MARKUP_RE.sub("", text)
    text = ACCEL_SUFFIX_RE.sub("", text)
    if mnemonics and text.count("_") == 1:
        text = re.sub(r"_(?=[^\W_])", "", text)
    text = html.unescape(AMP_ACCEL_RE.sub("", text))
    return " ".join(text.split())


def _letter_fraction(text: str) -> float:
    chars = [c for c in text if not c.isspace()]
    return sum(unicodedata.category(c)[0] in "LM" for c in chars) / max(len(chars), 1)


def drop_rule(english: str, translation: str, args) -> Optional[str]:
    """The first cleaning rule that drops this (cleaned) pair, or None to keep it."""
    sides = (english, translation)
    if not english or not translation:
        return "empty"
    if any(PLACEHOLDER_RE.search(s) for s in sides):
        return "placeholder"
    if any(TECHNICAL_RE.search(s) for s in sides):
        return "technical"
    if any(_letter_fraction(s) < 0.5 for s in sides):
        return "non_letters"
    if len(english.split()) < args.min_words or len(translation) < 2:
        return "too_short"
    if any(len(s) > args.max_chars or len(s.split()) > args.max_words for s in sides):
        return "too_long"
    if max(len(english), len(translation)) > args.max_ratio * min(len(english), len(translation)):
        return "length_ratio"
    if normalise(english) == normalise(translation):
        return "untranslated"
    return None


def pair_rule(msgid: str, msgstr: str, args, mnemonics: bool = False) -> Tuple[Optional[str], str, str]:
    """``(rule that drops the pair or None, cleaned English, cleaned translation)`` of one entry."""
    if not msgid or not msgstr:
        return "empty", "", ""
    english, translation = clean_text(msgid, mnemonics), clean_text(msgstr, mnemonics)
    return drop_rule(english, translation, args), english, translation


def collect_pairs(catalogues, args):
    """Read and clean every catalogue: ``(Counter {(lang, en, tr): occurrences}, drops, sources)``
    where drops is ``{rule: Counter(lang)}`` and sources lists each catalogue with its counts."""
    pairs, drops, sources = collections.Counter(), collections.defaultdict(collections.Counter), []
    for origin, lang, path in catalogues:
        entries, undecodable = read_mo(path)
        drops["undecodable"][lang] += undecodable
        kept, mnemonics = 0, uses_mnemonics(entries)
        for msgid, msgstr in entries:
            rule, english, translation = pair_rule(msgid, msgstr, args, mnemonics)
            if rule:
                drops[rule][lang] += 1
            else:
                pairs[(lang, english, translation)] += 1
                kept += 1
        sources.append({"origin": origin, "lang": lang, "path": path, "entries": len(entries), "kept": kept})
    return pairs, drops, sources


def deduplicate(pairs: collections.Counter, drops) -> List[Tuple[str, str, str]]:
    """One (lang, en, tr) per (lang, normalised en, normalised tr): the most frequent surface form,
    ties broken by the smallest (en, tr); the rest counted under ``duplicate``."""
    best = {}
    for (lang, english, translation), count in pairs.items():
        key = (lang, normalise(english), normalise(translation))
        candidate = (-count, english, translation)
        drops["duplicate"][lang] += count
        if key not in best or candidate < best[key]:
            best[key] = candidate
    for (lang, _, _), _ in best.items():
        drops["duplicate"][lang] -= 1
    return sorted((lang, en, tr) for (lang, _, _), (_, en, tr) in best.items())


# ---- splitting ----------------------------------------------------------------------------------

def english_hash(english: str) -> float:
    """sha1 of the normalised English as a fraction in [0, 1): the split key of its group."""
    return int(hashlib.sha1(normalise(english).encode("utf-8")).hexdigest(), 16) / 2.0 ** 160


def split_pairs(pairs, args) -> Dict[str, List[Tuple[str, str, str]]]:
    """Assign every English group to a split by its hash (see the module doc), then top up valid and
    test to ``--min-eval-pairs`` per language with whole groups from train, smallest hashes first."""
    groups = collections.defaultdict(list)
    for pair in pairs:
        groups[normalise(pair[1])].append(pair)
    hashes = {key: english_hash(key) for key in groups}
    split_of = {}
    for key, h in hashes.items():
        split_of[key] = ("test" if h < args.test_fraction else
                         "valid" if h < args.test_fraction + args.valid_fraction else "train")
    languages = sorted({pair[0] for pair in pairs})
    for split in ("test", "valid"):
        for lang in languages:
            have = sum(1 for key, members in groups.items() if split_of[key] == split
                       for pair in members if pair[0] == lang)
            candidates = sorted((h, key) for key, h in hashes.items() if split_of[key] == "train"
                                and any(pair[0] == lang for pair in groups[key]))
            for _, key in candidates:
                if have >= args.min_eval_pairs:
                    break
                split_of[key] = split
                have += sum(pair[0] == lang for pair in groups[key])
    result = {split: [] for split in SPLITS}
    for key, members in groups.items():
        result[split_of[key]].extend(members)
    return result


def cap_per_language(pairs, cap: Optional[int], seed: int, split: str):
    """At most ``cap`` pairs per language, a sample seeded by (seed, split, lang); None keeps all."""
    if cap is None:
        return sorted(pairs)
    by_lang = collections.defaultdict(list)
    for pair in sorted(pairs):
        by_lang[pair[0]].append(pair)
    kept = []
    for lang, members in sorted(by_lang.items()):
        rng = random.Random(f"{seed}:{split}:{lang}")
        kept.extend(members if len(members) <= cap else rng.sample(members, cap))
    return sorted(kept)


# ---- output -------------------------------------------------------------------------------------

def record_line(lang: str, english: str, translation: str) -> str:
    return json.dumps({"lang": lang, "src": f"{language_tag(lang)} {translation}", "tgt": english},
                      ensure_ascii=False) + "\n"


def _line_order(pair) -> str:
    return hashlib.sha1("\0".join(pair).encode("utf-8")).hexdigest()


def check_output(path: str, overwrite: bool) -> None:
    if os.path.isfile(path):
        raise ConfigError(f"--output {path}: is a file; give a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ConfigError(f"--output {path}: directory is not empty; pass --overwrite to replace its "
                          "train/valid/test.jsonl and stats.json (other files are kept)")


def write_outputs(out_dir: str, splits, stats: dict) -> None:
    """Write the splits and stats.json under temporary names, then rename them into place."""
    os.makedirs(out_dir, exist_ok=True)
    contents = {f"{split}.jsonl": "".join(record_line(*pair) for pair in sorted(splits[split], key=_line_order))
                for split in SPLITS}
    contents["stats.json"] = json.dumps(stats, indent=1, ensure_ascii=False, sort_keys=True) + "\n"
    for name, text in contents.items():
        tmp = os.path.join(out_dir, f".{name}.partial-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))


def make_stats(splits, clean: dict, drops, sources, missing, args) -> dict:
    """The stats.json content; ``clean``: pairs per language after de-duplication, before the caps."""
    counts = {lang: {split: sum(p[0] == lang for p in splits[split]) for split in SPLITS}
              for lang in args.languages}
    return {
        "pairs": counts,
        "clean_pairs": clean,
        "totals": {split: len(splits[split]) for split in SPLITS},
        "dropped": {rule: dict(sorted(drops[rule].items())) for rule in RULES if sum(drops[rule].values())},
        "catalogues": sources,
        "packages_not_installed": missing,
        "options": {k: v for k, v in sorted(vars(args).items()) if k not in ("output", "overwrite")},
    }


def print_summary(stats: dict) -> None:
    rows = [("lang", "catalogues", "clean", "train", "valid", "test")]
    for lang, counts in stats["pairs"].items():
        catalogues = sum(s["lang"] == lang for s in stats["catalogues"])
        rows.append((lang, catalogues, stats["clean_pairs"][lang], counts["train"], counts["valid"], counts["test"]))
    rows.append(("all", len(stats["catalogues"]), sum(stats["clean_pairs"].values()),
                 *(stats["totals"][split] for split in SPLITS)))
    for row in rows:
        print("  ".join(f"{cell:>10}" for cell in row))
    print("dropped: " + ", ".join(f"{rule} {sum(c.values())}" for rule, c in stats["dropped"].items()))


# ---- command line -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                epilog="example: python tools/build_mt_corpus.py --output /tmp/mt")
    p.add_argument("--output", required=True, help="directory for train/valid/test.jsonl and stats.json")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs in a non-empty --output")
    p.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES),
                   help="Debian packages whose catalogues to read (default: DEFAULT_PACKAGES)")
    p.add_argument("--locale-dir", help="read DIR/<lang>/LC_MESSAGES/*.mo instead of --packages")
    p.add_argument("--languages", nargs="+", default=list(LANGUAGES), help="source languages")
    p.add_argument("--max-pairs-per-language", type=int, help="cap train pairs per language (seeded sample)")
    p.add_argument("--max-eval-pairs-per-language", type=int, help="cap valid and test pairs per language")
    p.add_argument("--valid-fraction", type=float, default=0.02)
    p.add_argument("--test-fraction", type=float, default=0.02)
    p.add_argument("--min-eval-pairs", type=int, default=100,
                   help="top up valid and test to this many pairs per language from train")
    p.add_argument("--seed", type=int, default=1234, help="seed of the per-language caps")
    p.add_argument("--min-words", type=int, default=2, help="drop English with fewer words")
    p.add_argument("--max-chars", type=int, default=200, help="drop pairs with a longer side")
    p.add_argument("--max-words", type=int, default=60, help="drop pairs with a side of more words")
    p.add_argument("--max-ratio", type=float, default=3.0, help="drop pairs with a larger length ratio")
    return p


def check_args(args) -> None:
    bad = [lang for lang in args.languages if not re.fullmatch(r"[a-z]{2,3}", lang)]
    if bad or len(set(args.languages)) != len(args.languages):
        raise ConfigError(f"--languages {' '.join(args.languages)}: give distinct ISO 639 codes such as fr de")
    if not (0 <= args.valid_fraction and 0 <= args.test_fraction and args.valid_fraction + args.test_fraction < 1):
        raise ConfigError("--valid-fraction and --test-fraction must be >= 0 with a sum below 1")
    for flag in ("max_pairs_per_language", "max_eval_pairs_per_language"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1")
    check_output(args.output, args.overwrite)


def build(args) -> dict:
    """Read, clean, de-duplicate, split, cap and write; returns the stats. Raises ConfigError."""
    check_args(args)
    if args.locale_dir:
        catalogues, missing = directory_catalogues(args.locale_dir, args.languages), []
        where = f"--locale-dir {args.locale_dir}"
    else:
        catalogues, missing = package_catalogues(args.packages, args.languages)
        where = "the installed --packages"
    if not catalogues:
        raise ConfigError(f"no .mo catalogue of --languages {' '.join(args.languages)} found in {where}")
    pairs, drops, sources = collect_pairs(catalogues, args)
    unique = deduplicate(pairs, drops)
    splits = split_pairs(unique, args)
    clean = {lang: sum(p[0] == lang for p in unique) for lang in args.languages}
    splits = {split: cap_per_language(splits[split], args.max_pairs_per_language if split == "train"
                                      else args.max_eval_pairs_per_language, args.seed, split)
              for split in SPLITS}
    stats = make_stats(splits, clean, drops, sources, missing, args)
    write_outputs(args.output, splits, stats)
    print_summary(stats)
    return stats


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of tools/build_mt_corpus.py; exit code 2 with one message on user errors."""
    args = build_parser().parse_args(argv)
    try:
        build(args)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)

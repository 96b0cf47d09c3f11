"""Reading documents from JSON-lines and plain-text files (optionally gzip-compressed).

Shared by ``stablemoe-train-tokenizer`` and ``stablemoe-preprocess-data``.

Formats (``--input-format auto`` decides by file name):

* **jsonl** (names ending ``.jsonl``, ``.json``, ``.jsonl.gz``, ``.json.gz``): one JSON object per
  line; each requested key must hold a string. Blank lines are ignored.
* **text** (every other name): a document is a block of non-blank lines; blocks are separated by one
  or more blank (whitespace-only) lines. Line breaks inside a block are kept.

Reading is split in two so the expensive half can run in worker processes: ``iter_raw_records``
yields undecoded bytes with their ``file:line`` origin (cheap, in the main process), and
``decode_record`` decodes, parses and validates one record, raising ``InputDataError`` that names
``file:line`` and the problem.
"""
import gzip
import json
import os
from typing import Dict, Iterator, List, NamedTuple, Sequence

from stablemoe_megatron.errors import ConfigError, InputDataError

INPUT_FORMATS = ("auto", "jsonl", "text")
_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


class RawRecord(NamedTuple):
    """One undecoded document: its bytes and where it starts (for error messages)."""

    path: str
    line_no: int
    fmt: str  # "jsonl" or "text"
    data: bytes


def resolve_format(path: str, requested: str) -> str:
    """The format of ``path``: ``requested`` unless it is ``auto``, then decided by the file name."""
    if requested != "auto":
        return requested
    return "jsonl" if path.lower().endswith(_JSONL_SUFFIXES) else "text"


def check_inputs(paths: Sequence[str], requested_format: str, keys: Sequence[str]) -> List[str]:
    """Validate ``--input``/``--json-keys``; return each input's format. Raises ConfigError."""
    if not paths:
        raise ConfigError("--input is required: pass one or more .jsonl or text files")
    formats = []
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"--input {path}: no such file; pass existing .jsonl or text files")
        formats.append(resolve_format(path, requested_format))
    if not keys or len(set(keys)) != len(keys):
        raise ConfigError(f"--json-keys {' '.join(keys)}: give one or more distinct keys, e.g. --json-keys text")
    if "text" in formats and len(keys) != 1:
        raise ConfigError(
            f"--json-keys {' '.join(keys)}: plain-text inputs hold a single text per document; "
            "give exactly one key (it names the output), or convert the input to .jsonl"
        )
    return formats


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def iter_raw_records(paths: Sequence[str], formats: Sequence[str]) -> Iterator[RawRecord]:
    """Yield every document of every input, undecoded, in input order."""
    for path, fmt in zip(paths, formats):
        try:
            with _open_binary(path) as f:
                if fmt == "jsonl":
                    yield from _jsonl_records(path, f)
                else:
                    yield from _text_records(path, f)
        except (OSError, EOFError) as exc:  # unreadable or truncated/corrupt .gz
            raise ConfigError(f"--input {path}: cannot be read ({exc}); check or re-create the file") from None


def _jsonl_records(path: str, f) -> Iterator[RawRecord]:
    for line_no, line in enumerate(f, start=1):
        if line.strip():
            yield RawRecord(path, line_no, "jsonl", line)


def _text_records(path: str, f) -> Iterator[RawRecord]:
    block: List[bytes] = []
    start = 0
    for line_no, line in enumerate(f, start=1):
        if line.strip():
            if not block:
                start = line_no
            block.append(line)
        elif block:
            yield RawRecord(path, start, "text", b"".join(block))
            block = []
    if block:
        yield RawRecord(path, start, "text", b"".join(block))


def _decode_utf8(record: RawRecord) -> str:
    encoding = "utf-8-sig" if record.line_no == 1 else "utf-8"
    try:
        return record.data.decode(encoding)
    except UnicodeDecodeError as exc:
        bad_line = record.line_no + record.data[: exc.start].count(b"\n")
        raise InputDataError(f"{record.path}:{bad_line}: not valid UTF-8 (byte offset {exc.start})") from None


def decode_record(record: RawRecord, keys: Sequence[str]) -> Dict[str, str]:
    """Decode one record into ``{key: text}``; raises InputDataError naming ``file:line``."""
    text = _decode_utf8(record)
    if record.fmt == "text":
        return {keys[0]: text.rstrip("\r\n")}
    where = f"{record.path}:{record.line_no}"
    try:
        obj = json.loads(text)
    except ValueError as exc:
        raise InputDataError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise InputDataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    texts = {}
    for key in keys:
        if key not in obj:
            raise InputDataError(f"{where}: no key {key!r} (present: {', '.join(map(repr, list(obj)[:8]))})")
        value = obj[key]
        if not isinstance(value, str):
            raise InputDataError(f"{where}: value of {key!r} is {type(value).__name__}, expected a string")
        texts[key] = value
    return texts

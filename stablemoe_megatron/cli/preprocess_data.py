"""Tokenize documents into Megatron indexed datasets (``{prefix}_{key}_document.bin/.idx``).

The flags follow Megatron-LM's ``tools/preprocess_data.py`` (``--input``, ``--json-keys``,
``--output-prefix``, ``--tokenizer-type``, ``--tokenizer-model``, ``--vocab-file``, ``--merge-file``,
``--vocab-size``, ``--append-eod``, ``--workers``, ``--log-interval``), and so does the output:
each document is one sequence, and a document whose text yields no tokens (an empty text) is kept
as an empty document: it has an entry in the ``.idx`` document index and no sequence, and
``--append-eod`` adds nothing to it (Megatron-LM appends the end-of-document id only to a document
with tokens). Differences, each for a reason:

* ``--input`` takes several files, ``.gz`` too, and plain-text files (a document is a block of
  non-blank lines, blocks separated by blank lines; see ``text_inputs``), so a book or a folder of
  text needs no conversion.
* One sequence per document (no sentence splitting). Empty documents are counted in the summary; a
  key whose documents are all empty is written (as Megatron-LM writes it) with a warning, since
  nothing can be trained on it.
* A malformed record (not JSON, key missing, value not a string, not UTF-8) stops the run with one
  ``file:line`` message and exit code 2; ``--skip-bad-lines`` skips and counts such records instead.
* An input that yields no document at all (an empty file, only blank lines, or only records skipped
  by ``--skip-bad-lines``) stops the run with exit code 2 and writes nothing: a 0-document dataset
  would only make training fail later, further from the cause.
* ``--tokenizer-type NullTokenizer --vocab-size N``: the texts are token ids separated by whitespace
  (see :mod:`stablemoe_megatron.tokenizer`); a word that is not an id in ``[0, N]`` is a malformed
  record (``file:line``), like invalid JSON.
* Progress goes to stderr: a tqdm bar on a terminal; otherwise (a log file, a Slurm job) a plain
  line every 30 s and one at the end, because a bar's carriage returns turn logs into garbage.
* Output is written under temporary names next to the final ones and renamed into place
  (``os.replace``) only after everything succeeded, ``.idx`` last, so a killed or failed run never
  leaves a half-written dataset under the final name; a failed run deletes its temporaries (a run
  killed with SIGKILL cannot, and leaves ``*.partial-<pid>`` files behind).

Token ids are stored as uint16 when the vocabulary has fewer than 65500 ids, else int32
(``DType.optimal_dtype``), exactly as Megatron-LM does; ``IndexedDataset(prefix)`` reads the result.
"""
import argparse
import multiprocessing
import os
import signal
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from stablemoe_megatron.cli.text_inputs import (
    INPUT_FORMATS,
    RawRecord,
    check_inputs,
    decode_record,
    iter_raw_records,
)
from stablemoe_megatron.errors import ConfigError, InputDataError
from stablemoe_megatron.tokenizer import TOKENIZER_TYPES, TokenIdError, build_tokenizer

PROG = "stablemoe-preprocess-data"
MAX_REPORTED_BAD_LINES = 5
PLAIN_PROGRESS_SECONDS = 30.0  # seconds between progress lines when stderr is not a terminal


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags (Megatron-LM's names where Megatron has the flag)."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    g = p.add_argument_group("input")
    g.add_argument("--input", nargs="+", required=True, help="input files: .jsonl or plain text, optionally .gz")
    g.add_argument("--input-format", choices=INPUT_FORMATS, default="auto",
                   help="auto: .jsonl/.json(.gz) are JSON lines, any other name is plain text")
    g.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenize (one dataset each)")
    g.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed records (counted and reported) instead of stopping")
    g = p.add_argument_group("tokenizer")
    g.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--tokenizer-model", help="SentencePiece .model, or a directory with tokenizer.json")
    g.add_argument("--vocab-file", help="GPT-2 vocab.json (GPT2BPETokenizer)")
    g.add_argument("--merge-file", help="GPT-2 merges.txt (GPT2BPETokenizer)")
    g.add_argument("--vocab-size", type=int,
                   help="NullTokenizer's number of token ids before its end-of-document id (which is this number)")
    g.add_argument("--append-eod", action="store_true", help="append the end-of-document id to every document")
    g = p.add_argument_group("output")
    g.add_argument("--output-prefix", required=True,
                   help="writes {prefix}_{key}_document.bin/.idx; the directory is created if needed")
    g = p.add_argument_group("runtime")
    g.add_argument("--workers", type=int, default=1, help="tokenizer processes (1 = in this process)")
    g.add_argument("--chunksize", type=int, default=64, help="documents per task sent to a worker")
    g.add_argument("--log-interval", type=int, default=1000,
                   help="update the progress every N documents (a bar on a terminal; in a log, a line "
                        f"once {PLAIN_PROGRESS_SECONDS:.0f} s have passed since the last one)")
    return p


class DatasetWriter:
    """One key's output: an IndexedDatasetBuilder on temporary files, renamed into place by ``commit``."""

    def __init__(self, output_prefix: str, key: str, vocab_size: int):
        idx_mod = _indexed_dataset_module()
        self.prefix = f"{output_prefix}_{key}_document"
        self.final_bin, self.final_idx = self.prefix + ".bin", self.prefix + ".idx"
        suffix = f".partial-{os.getpid()}"
        self.tmp_bin, self.tmp_idx = self.final_bin + suffix, self.final_idx + suffix
        self._builder = idx_mod.IndexedDatasetBuilder(
            self.tmp_bin, dtype=idx_mod.DType.optimal_dtype(vocab_size)
        )
        self._finalized = False
        self.documents = 0
        self.tokens = 0
        self.empty_documents = 0

    def add(self, token_ids: np.ndarray) -> None:
        """One document as one sequence; an empty one as Megatron-LM writes it: no sequence, a document entry."""
        self._builder.add_document(token_ids, [len(token_ids)] if len(token_ids) else [])
        self.documents += 1
        self.tokens += len(token_ids)
        self.empty_documents += not len(token_ids)

    def finalize(self) -> None:
        """Write the temporary .idx (closes the temporary .bin)."""
        self._builder.finalize(self.tmp_idx)
        self._finalized = True

    def discard(self) -> None:
        """Close and delete the temporaries (used when the run fails)."""
        if not self._finalized:
            self._builder.data_file.close()
        for path in (self.tmp_bin, self.tmp_idx):
            _remove_if_exists(path)


def _indexed_dataset_module():
    """Import megatron-core's indexed_dataset lazily (it imports torch), hiding its TE/apex/jit warnings."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def _remove_if_exists(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def commit_outputs(writers: Sequence[DatasetWriter]) -> None:
    """Rename all temporaries to their final names, every .idx after every .bin.

    Stale final .idx files are deleted first, so a new .bin is never paired with an old .idx.
    If a rename fails, the final files already placed are removed again (they would be a partial
    dataset) and the error propagates; the caller then removes the temporaries.
    """
    placed: List[str] = []
    try:
        for w in writers:
            _remove_if_exists(w.final_idx)
        for w in writers:
            os.replace(w.tmp_bin, w.final_bin)
            placed.append(w.final_bin)
        for w in writers:
            os.replace(w.tmp_idx, w.final_idx)
            placed.append(w.final_idx)
    except BaseException:
        for path in placed:
            _remove_if_exists(path)
        raise


# ---- tokenization, in worker processes or in-process -------------------------------------------

_WORKER_STATE: dict = {}


def _set_encoder_state(tokenizer, keys: Sequence[str], append_eod: bool) -> None:
    """Keep the tokenizer and settings that ``encode_record`` uses in module state."""
    _WORKER_STATE.update(tokenizer=tokenizer, keys=tuple(keys), append_eod=append_eod)


def _init_pool_worker(tokenizer, keys: Sequence[str], append_eod: bool) -> None:
    """Pool initializer: the parent handles Ctrl-C/SIGTERM and terminates the pool, workers just exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _set_encoder_state(tokenizer, keys, append_eod)


def encode_record(record: RawRecord):
    """Decode and tokenize one record. Returns ``(ids_by_key, nbytes, error_message_or_None)``."""
    tokenizer = _WORKER_STATE["tokenizer"]
    try:
        texts = decode_record(record, _WORKER_STATE["keys"])
    except InputDataError as exc:
        return None, len(record.data), str(exc)
    ids_by_key = {}
    for key, text in texts.items():
        try:
            ids = tokenizer.tokenize(text)
        except TokenIdError as exc:  # NullTokenizer: the text is not token ids
            return None, len(record.data), f"{record.path}:{record.line_no}: {key!r}: {exc}"
        if ids and _WORKER_STATE["append_eod"]:  # Megatron-LM: no eod for a document without tokens
            ids.append(tokenizer.eod)
        ids_by_key[key] = np.asarray(ids, dtype=np.int32)
    return ids_by_key, len(record.data), None


class RunStats:
    """Counters for the progress output and the final summary."""

    def __init__(self):
        self.records = 0
        self.bytes = 0
        self.bad_records = 0
        self.bad_examples: List[str] = []
        self.started = time.time()
        self.writers: Dict[str, DatasetWriter] = {}

    def rates_line(self) -> str:
        """``N docs, X MB, Y docs/s, Z MB/s`` since ``started``: the progress numbers, in one place."""
        elapsed = max(time.time() - self.started, 1e-9)
        mb = self.bytes / 1e6
        return f"{self.records} docs, {mb:.2f} MB, {self.records / elapsed:.0f} docs/s, {mb / elapsed:.2f} MB/s"


class BarProgress:
    """A tqdm bar, for a terminal (it redraws its line with carriage returns)."""

    def __init__(self, stats: RunStats, stream):
        from tqdm import tqdm

        self._stats = stats
        self._bar = tqdm(unit="docs", file=stream, mininterval=0.5, dynamic_ncols=True)

    def update(self, new_records: int) -> None:
        elapsed = max(time.time() - self._stats.started, 1e-9)
        self._bar.set_postfix_str(f"{self._stats.bytes / elapsed / 1e6:.2f} MB/s", refresh=False)
        self._bar.update(new_records)

    def finish(self) -> None:
        """Nothing to add: the bar already shows the totals (the summary follows on stdout)."""

    def close(self) -> None:
        self._bar.close()


class PlainProgress:
    """Whole lines for logs and Slurm output: one at most every ``interval`` seconds and one at the end.

    Never writes a carriage return, so a log file stays readable with ``less`` or ``grep``.
    """

    def __init__(self, stats: RunStats, stream, interval: float = PLAIN_PROGRESS_SECONDS):
        self._stats = stats
        self._stream = stream
        self._interval = interval
        self._last = time.monotonic()

    def update(self, new_records: int) -> None:
        if time.monotonic() - self._last >= self._interval:
            self._write("")

    def finish(self) -> None:
        self._write(" (all input read)")

    def close(self) -> None:
        """Nothing to release (``finish`` wrote the last line on success)."""

    def _write(self, suffix: str) -> None:
        print(f"{PROG}: {self._stats.rates_line()}{suffix}", file=self._stream, flush=True)
        self._last = time.monotonic()


def make_progress(stats: RunStats, stream=None):
    """A tqdm bar when ``stream`` (default stderr) is a terminal, else plain periodic lines."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return BarProgress(stats, stream)
    return PlainProgress(stats, stream)


def tokenize_into(writers: Dict[str, DatasetWriter], results, args, stats: RunStats) -> None:
    """Consume encoded records in input order, writing each key's ids; handles bad records."""
    progress = make_progress(stats)
    pending = 0
    try:
        for ids_by_key, nbytes, error in results:
            stats.records += 1
            stats.bytes += nbytes
            pending += 1
            if error is not None:
                if not args.skip_bad_lines:
                    raise InputDataError(f"{error}; fix or remove that line, or pass --skip-bad-lines")
                stats.bad_records += 1
                if len(stats.bad_examples) < MAX_REPORTED_BAD_LINES:
                    stats.bad_examples.append(error)
                continue
            for key, ids in ids_by_key.items():
                writers[key].add(ids)
            if pending >= args.log_interval:
                progress.update(pending)
                pending = 0
        progress.update(pending)
        progress.finish()
    finally:
        progress.close()


def check_not_empty(args, stats: RunStats) -> None:
    """Refuse to write a 0-document dataset: training on it would fail later, far from the cause.

    Raises InputDataError (exit code 2, nothing written) naming the input and saying why there is no
    document: the input has none, or every record was skipped as bad. (Documents that are all empty
    are written, as Megatron-LM writes them: see :func:`warn_all_empty`.)
    """
    where = f"--input {' '.join(args.input)}"
    fix = "so no dataset was written; pass a file with at least one non-empty document"
    if stats.records == 0:
        raise InputDataError(f"{where}: no documents (the input is empty or only blank lines), {fix}")
    if stats.records == stats.bad_records:
        raise InputDataError(f"{where}: no documents (all {stats.records} records were skipped as bad by "
                             f"--skip-bad-lines), {fix}")


def warn_all_empty(writers: Dict[str, DatasetWriter], args, stream=None) -> None:
    """One warning line on ``stream`` (default stderr) per key whose documents are all empty."""
    for key, writer in writers.items():
        if writer.tokens == 0:
            print(f"{PROG}: warning: --input {' '.join(args.input)}: every {key!r} is empty ({writer.documents} "
                  "documents, 0 tokens); written as Megatron-LM writes it, but training cannot use it",
                  file=stream or sys.stderr)


def _check_args(args) -> None:
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be at least 1")
    if args.chunksize < 1:
        raise ConfigError(f"--chunksize {args.chunksize}: must be at least 1")
    if args.log_interval < 1:
        raise ConfigError(f"--log-interval {args.log_interval}: must be at least 1")
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--output-prefix {args.output_prefix}: {out_dir} is not a directory")


def run(args) -> RunStats:
    """Tokenize all inputs into the datasets; on any failure no final file is left behind."""
    _check_args(args)
    formats = check_inputs(args.input, args.input_format, args.json_keys)
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file,
                                args.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    stats = RunStats()
    writers: Dict[str, DatasetWriter] = {}
    pool = None
    try:
        for key in args.json_keys:
            writers[key] = DatasetWriter(args.output_prefix, key, tokenizer.vocab_size)
        records = iter_raw_records(args.input, formats)
        if args.workers == 1:
            _set_encoder_state(tokenizer, args.json_keys, args.append_eod)
            results = map(encode_record, records)
        else:
            # spawn, not fork: forking a process whose threads (torch, gloo, a test runner's) may
            # hold a lock can deadlock the child; the tokenizer is pickled to each worker instead
            pool = multiprocessing.get_context("spawn").Pool(
                args.workers, initializer=_init_pool_worker, initargs=(tokenizer, args.json_keys, args.append_eod)
            )
            results = pool.imap(encode_record, records, chunksize=args.chunksize)
        stats.started = time.time()  # after the (slow) megatron/torch import and the pool start
        tokenize_into(writers, results, args, stats)
        check_not_empty(args, stats)
        for writer in writers.values():
            writer.finalize()
        commit_outputs(list(writers.values()))
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    stats.writers = writers
    warn_all_empty(writers, args)
    return stats


def print_summary(stats: RunStats, args) -> None:
    """Documents, tokens, seconds and skipped records, on stdout."""
    seconds = time.time() - stats.started
    print(f"{PROG}: {stats.records} records, {stats.bytes / 1e6:.2f} MB in {seconds:.1f} s "
          f"({stats.records / max(seconds, 1e-9):.0f} docs/s, {stats.bytes / 1e6 / max(seconds, 1e-9):.2f} MB/s)")
    for key, w in stats.writers.items():
        empty = f" ({w.empty_documents} empty)" if w.empty_documents else ""
        print(f"  {key}: {w.documents} documents{empty}, {w.tokens} tokens -> {w.final_bin}, {w.final_idx}")
    if stats.bad_records:
        print(f"  skipped {stats.bad_records} bad records (--skip-bad-lines); first ones:")
        for example in stats.bad_examples:
            print(f"    {example}")


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler so the same cleanup as for Ctrl-C runs."""


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``stablemoe-preprocess-data``; exit code 2 with one message on user errors."""
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        stats = run(args)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        print(f"{PROG}: interrupted; temporary files removed, no dataset written", file=sys.stderr)
        sys.exit(128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT))
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print_summary(stats, args)

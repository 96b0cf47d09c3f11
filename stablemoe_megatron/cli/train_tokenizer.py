"""Train a SentencePiece tokenizer (BPE or unigram) on .jsonl / plain-text files.

Writes ``{model_prefix}.model`` and ``{model_prefix}.vocab``; use the model with
``--tokenizer-type SentencePieceTokenizer --tokenizer-model {model_prefix}.model``.

Choices, each for a reason:

* ids: ``<unk>``=0, ``<s>``=1, ``</s>``=2 (the end-of-document id ``eod``), no pad piece;
* ``byte_fallback``: text outside the learned pieces becomes UTF-8 byte pieces, never ``<unk>``;
* identity normalisation and kept whitespace (no NFKC, no whitespace collapsing), so code and
  indentation survive and ``detokenize(tokenize(text)) == text``;
* training sentences are the non-blank lines of the documents (SentencePiece learns from lines);
  ``--max-sentences`` caps them by a seeded uniform sample (reservoir sampling, input order kept);
* a single training thread by default and a fixed seed, so the same input and flags give a
  byte-identical model.
"""
import argparse
import os
import random
import sys
import time
from typing import Iterable, Iterator, List, Optional, Sequence

from stablemoe_megatron.cli.text_inputs import INPUT_FORMATS, check_inputs, decode_record, iter_raw_records
from stablemoe_megatron.errors import ConfigError, InputDataError

PROG = "stablemoe-train-tokenizer"
# SentencePiece drops longer training sentences; ours are lines, so this only skips giant lines.
MAX_SENTENCE_BYTES = 16384


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="input files: .jsonl or plain text, optionally .gz")
    p.add_argument("--input-format", choices=INPUT_FORMATS, default="auto",
                   help="auto: .jsonl/.json(.gz) are JSON lines, any other name is plain text")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys whose text is used")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed records instead of stopping")
    p.add_argument("--model-prefix", required=True, help="writes {prefix}.model and {prefix}.vocab")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--character-coverage", type=float, default=1.0,
                   help="fraction of characters covered by pieces (rest: byte fallback); 1.0 for English")
    p.add_argument("--max-sentences", type=int, default=5_000_000,
                   help="train on a seeded random sample of at most this many lines")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--num-threads", type=int, default=1,
                   help="SentencePiece training threads (more is faster; 1 guarantees identical models)")
    p.add_argument("--verbose", action="store_true", help="show SentencePiece's own training log")
    p.add_argument("--user-defined-symbols", nargs="+", default=[], metavar="SYMBOL",
                   help="strings always kept as one piece (SentencePiece user_defined_symbols), e.g. "
                        "the language tags <fr> <de> of the translation corpus")
    return p


def iter_training_lines(args, formats: Sequence[str], bad_counter: List[int]) -> Iterator[str]:
    """Non-blank lines of every document (all --json-keys), in input order."""
    for record in iter_raw_records(args.input, formats):
        try:
            texts = decode_record(record, args.json_keys)
        except InputDataError as exc:
            if not args.skip_bad_lines:
                raise InputDataError(f"{exc}; fix or remove that line, or pass --skip-bad-lines") from None
            bad_counter[0] += 1
            continue
        for text in texts.values():
            for line in text.splitlines():
                if line.strip():
                    yield line


def reservoir_sample(items: Iterable[str], k: int, seed: int) -> List[str]:
    """A uniform sample of at most ``k`` items (all if fewer), deterministic in ``seed``, input order kept."""
    rng = random.Random(seed)
    reservoir: List[tuple] = []
    for i, item in enumerate(items):
        if i < k:
            reservoir.append((i, item))
        else:
            j = rng.randint(0, i)
            if j < k:
                reservoir[j] = (i, item)
    reservoir.sort(key=lambda pair: pair[0])
    return [item for _, item in reservoir]


def _check_args(args) -> None:
    if args.vocab_size < 300:
        raise ConfigError(f"--vocab-size {args.vocab_size}: must be at least 300 (256 byte pieces + specials + pieces)")
    if not 0.0 < args.character_coverage <= 1.0:
        raise ConfigError(f"--character-coverage {args.character_coverage}: must be in (0, 1]")
    if args.max_sentences < 1:
        raise ConfigError(f"--max-sentences {args.max_sentences}: must be at least 1")
    if args.num_threads < 1:
        raise ConfigError(f"--num-threads {args.num_threads}: must be at least 1")


def train(args) -> dict:
    """Read, sample and train; returns a small summary dict. Raises ConfigError on user errors."""
    import sentencepiece

    _check_args(args)
    formats = check_inputs(args.input, args.input_format, args.json_keys)
    bad = [0]
    sentences = reservoir_sample(iter_training_lines(args, formats, bad), args.max_sentences, args.seed)
    if not sentences:
        raise ConfigError(f"--input {' '.join(args.input)}: no text found under --json-keys {' '.join(args.json_keys)}")
    out_dir = os.path.dirname(os.path.abspath(args.model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    sentencepiece.set_random_generator_seed(args.seed)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_prefix=args.model_prefix,
            model_type=args.model_type,
            vocab_size=args.vocab_size,
            character_coverage=args.character_coverage,
            byte_fallback=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=list(args.user_defined_symbols),
            max_sentence_length=MAX_SENTENCE_BYTES,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=args.num_threads,
            minloglevel=0 if args.verbose else 2,
        )
    except RuntimeError as exc:  # "Vocabulary size too high" (small input) or "smaller than required_chars"
        message = str(exc).strip()
        hint = ("a larger --vocab-size (every distinct character needs a piece) or a lower --character-coverage"
                if "required_chars" in message else "a smaller --vocab-size or more --input text")
        raise ConfigError(
            f"SentencePiece training failed with --vocab-size {args.vocab_size}: {message}; try {hint}"
        ) from None
    return {"sentences": len(sentences), "bad_records": bad[0], "model": args.model_prefix + ".model"}


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Entry point of ``stablemoe-train-tokenizer``; exit code 2 with one message on user errors."""
    args = build_parser().parse_args(argv)
    started = time.time()
    try:
        summary = train(args)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    skipped = f", skipped {summary['bad_records']} bad records" if summary["bad_records"] else ""
    print(f"{PROG}: trained a {args.model_type} model with {args.vocab_size} pieces on "
          f"{summary['sentences']} lines in {time.time() - started:.1f} s{skipped} -> {summary['model']}")

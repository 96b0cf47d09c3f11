"""``stablemoe-translate`` / ``tools/translate.py``: translate with a trained encoder-decoder, score it.

    stablemoe-translate --checkpoint runs/mt/checkpoints --input data/mt/test.jsonl --beam-size 5 \\
        --output hyps.jsonl --score --score-json scores.json
    stablemoe-translate --exported export/ --input sentences.txt --lang fr     # one source per line

The model runs in plain torch (:mod:`stablemoe_megatron.export.seq2seq`), read from one of our
torch_dist checkpoints (run directory or ``iter_*``; ``--model-family encoder_decoder``) or from a
``convert_checkpoint export`` directory of one. --input is a .jsonl of the corpus builder's records
(``{"lang", "src", "tgt"}``, ``src`` starting with its language tag) or plain text with one source
per line (``--lang xx`` puts the tag ``<xx>`` in front of each). Decoding is fairseq's (see
stablemoe_megatron/export/translate.py): greedy for --beam-size 1, beam search otherwise, scores
divided by length ** --lenpen, at most --max-len-a * source length + --max-len-b tokens.

Output: --output FILE.jsonl writes each input record with its "hyp", any other --output one
hypothesis per line; without --output the hypotheses go to stdout (unless --score is given, then
only the table is printed). --score (a .jsonl --input whose records all have "lang" and "tgt")
prints sacrebleu's corpus BLEU and chrF per language and their average over the languages, and
--score-json FILE also writes them as JSON. Exit code 2 with one message on bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from stablemoe_megatron.entry import run_entry_point
from stablemoe_megatron.errors import ConfigError

PROG = "stablemoe-translate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     description="Translate with a trained encoder-decoder model (plain torch, "
                                                 "greedy or beam search) and score it with BLEU and chrF.",
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", metavar="DIR",
                       help="our torch_dist checkpoint: run directory or iter_* directory")
    model.add_argument("--exported", metavar="DIR", help="a directory written by convert_checkpoint export")
    parser.add_argument("--input", required=True, metavar="FILE",
                        help=".jsonl records {\"lang\", \"src\", \"tgt\"} or plain text, one source per line")
    parser.add_argument("--lang", default=None, help="plain-text --input: prefix every line with the tag <LANG>")
    parser.add_argument("--beam-size", type=int, default=5, help="1 = greedy search (default 5)")
    parser.add_argument("--lenpen", type=float, default=1.0,
                        help="length penalty: scores are divided by length ** LENPEN (fairseq's; default 1)")
    parser.add_argument("--max-len-a", type=float, default=0.0,
                        help="at most A * source length + B tokens per hypothesis (default 0)")
    parser.add_argument("--max-len-b", type=int, default=None,
                        help="default: the model's --decoder-seq-length - 1 (its longest training target)")
    parser.add_argument("--min-len", type=int, default=1, help="no EOS before this many tokens (default 1)")
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per batch (speed and memory only)")
    parser.add_argument("--output", metavar="FILE", default=None,
                        help="FILE.jsonl: the records with their \"hyp\"; other names: one hypothesis per line")
    parser.add_argument("--score", action="store_true", help="print BLEU and chrF per language and their average")
    parser.add_argument("--score-json", metavar="FILE", default=None, help="with --score: also write the scores here")
    parser.add_argument("--stage", type=int, choices=(1, 2), default=None,
                        help="--checkpoint only: routing as convert_checkpoint export --stage "
                             "(default: the checkpoint's)")
    for flag in ("--tokenizer-model", "--vocab-file", "--merge-file"):
        parser.add_argument(flag, default=None, help="--checkpoint only: tokenizer file, if it moved since training")
    return parser


def _log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Check the flags and the input, load the model, translate, write and score; the scores or {}."""
    from stablemoe_megatron.export import translate

    args = build_parser().parse_args(argv)
    if args.score_json and not args.score:
        raise ConfigError("--score-json needs --score")
    search = translate.Search(beam_size=args.beam_size, lenpen=args.lenpen, max_len_a=args.max_len_a,
                              max_len_b=args.max_len_b, min_len=args.min_len, batch_size=args.batch_size)
    search.check()
    records = translate.read_records(args.input, args.lang, args.score)
    files = {k: v for k, v in (("tokenizer_model", args.tokenizer_model), ("vocab_file", args.vocab_file),
                               ("merge_file", args.merge_file)) if v}
    if files and args.exported:
        raise ConfigError("--tokenizer-model / --vocab-file / --merge-file apply to --checkpoint "
                          "(an export holds its tokenizer)")
    model, tokenizer = translate.load_model(args.checkpoint, args.exported, args.stage, files)
    _log(f"translating {len(records)} sentence(s) with beam {search.beam_size}, lenpen {search.lenpen}")
    hyps = translate.translate_texts(model, tokenizer, [r["src"] for r in records], search, log=_log)
    _write(args, records, hyps)
    if not args.score:
        return {}
    scores = translate.corpus_scores(hyps, [r["tgt"] for r in records], [r["lang"] for r in records])
    print(translate.format_scores(scores), flush=True)
    if args.score_json:
        Path(args.score_json).write_text(json.dumps(scores, indent=1) + "\n")
    return scores


def _write(args, records, hyps) -> None:
    if args.output is None:
        if not args.score:
            for hyp in hyps:
                print(hyp)
        return
    if args.output.endswith(".jsonl"):
        lines = [json.dumps({**record, "hyp": hyp}, ensure_ascii=False) for record, hyp in zip(records, hyps)]
    else:
        lines = list(hyps)
    Path(args.output).write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    _log(f"wrote {len(lines)} translation(s) to {args.output}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: 0 on success, 2 with one message on bad input."""
    return run_entry_point(PROG, run, argv)


if __name__ == "__main__":
    sys.exit(main())

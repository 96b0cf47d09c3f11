"""``stablemoe-convert-checkpoint`` / ``tools/convert_checkpoint.py``: inspect, reshard, export, import.

    convert_checkpoint.py inspect  CKPT [--json]
    convert_checkpoint.py reshard  CKPT OUT --tp 2 --pp 1 --ep 4 [--overwrite]
    convert_checkpoint.py export   CKPT OUT_DIR [--stage 2] [--dtype bfloat16] [--tokenizer-model F ...]
    convert_checkpoint.py import   EXPORT_DIR OUT --tp 1 --pp 2 --ep 2 [--overwrite]
    convert_checkpoint.py perplexity EXPORT_DIR --input test.jsonl [--seq-length 1024]
    convert_checkpoint.py generate EXPORT_DIR --prompt "Once upon a time" [--max-new-tokens 40]
                          [--temperature 0.8 --top-k 50 --top-p 0.9 --repetition-penalty 1.2 --seed 0]

CKPT is a run directory (``--save`` of training; the tracker names the latest iteration) or one
``iter_*`` directory. reshard and import write a run directory (``OUT/iter_XXXXXXX`` + tracker)
that ``--load`` accepts; they hold the model only (resume training with ``--no-load-optim``) and
start their own CPU processes (``pp x lcm(tp, ep)``; no torchrun, no GPU). export writes one
``model.safetensors`` + ``config.json`` + the tokenizer, independent of the training layout;
perplexity and generate run such an export with plain torch. perplexity scores every token of
the whole --input file (see its --help); generate prints the prompt and its continuation
detokenised together, greedy by default. Exit code 2 with one message on bad input; see
stablemoe_megatron/export/ for the formats.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from stablemoe_megatron.errors import ConfigError

PROG = "convert_checkpoint"


def _layout_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tp", type=int, default=1, help="target tensor-parallel size (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size (default 1)")
    parser.add_argument("--ep", type=int, default=1, help="target expert-parallel size (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Inspect, reshard, export and import stablemoe-megatron checkpoints; run an export.",
        epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = sub.add_parser("inspect", help="config, iteration, stage, layout, parameter counts")
    inspect.add_argument("checkpoint", help="run directory (--save of training) or one iter_* directory")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    reshard = sub.add_parser("reshard", help="torch_dist -> torch_dist at another TP/PP/EP (model only)")
    reshard.add_argument("checkpoint", help="run directory or iter_* directory")
    reshard.add_argument("out", help="new run directory (iter_* + tracker)")
    _layout_flags(reshard)
    export = sub.add_parser("export", help="torch_dist -> model.safetensors + config.json + tokenizer")
    export.add_argument("checkpoint", help="run directory or iter_* directory")
    export.add_argument("out", help="new directory: model.safetensors, config.json, tokenizer")
    export.add_argument("--stage", type=int, choices=(1, 2), default=None,
                        help="routing of the export: 2 = the frozen distilled router (default: the checkpoint's stage)")
    export.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="store floating tensors in this dtype (default: as trained)")
    for flag in ("--tokenizer-model", "--vocab-file", "--merge-file"):
        export.add_argument(flag, default=None, help="tokenizer file, if it moved since training")
    export.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    imp = sub.add_parser("import", help="an export -> torch_dist at any TP/PP/EP (model only)")
    imp.add_argument("export_dir", help="a directory written by export")
    imp.add_argument("out", help="new run directory (iter_* + tracker)")
    _layout_flags(imp)
    _perplexity_flags(sub)
    _generate_flags(sub)
    return parser


PERPLEXITY_DOC = """\
Next-token perplexity of an export on the whole --input file (plain torch). Each document is
tokenised and followed by the end-of-document id, the documents are concatenated in file order,
and the stream is cut into non-overlapping windows of --seq-length predictions (no context
carried across windows; the last window may be shorter). Every token but the first is scored
once. Prints one JSON line: loss (mean nats per token), ppl = exp(loss), tokens (predictions
scored), windows, seq_length, documents, input. The trainer's test perplexity is a different
measurement: --eval-iters global batches of windows from its preprocessed test split, in
megatron's shuffled order, so the two numbers need not agree."""


def _perplexity_flags(sub) -> None:
    ppl = sub.add_parser("perplexity", help="perplexity of an export on a whole text/jsonl file (plain torch)",
                         description=PERPLEXITY_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    ppl.add_argument("export_dir")
    ppl.add_argument("--input", required=True, help=".jsonl (\"text\" per line) or a plain text file (one document)")
    ppl.add_argument("--seq-length", type=int, default=None,
                     help="predictions per window (default: training's --seq-length)")
    ppl.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (speed and memory only)")


def _generate_flags(sub) -> None:
    gen = sub.add_parser("generate", help="continue a prompt with an export (plain torch); greedy by default",
                         description="Print the prompt and its continuation, detokenised together. Each step: "
                                     "repetition penalty, then temperature (0 = greedy), top-k, top-p, sample.")
    gen.add_argument("export_dir")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0 = greedy argmax (default); > 0 samples from softmax(logits / T)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0 = off)")
    gen.add_argument("--top-p", type=float, default=1.0,
                     help="nucleus: sample among the fewest most likely tokens holding probability >= p; "
                          "in (0, 1] (default 1 = off)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0,
                     help="> 1 discourages tokens already in the text (CTRL; e.g. 1.2); default 1 = off")
    gen.add_argument("--seed", type=int, default=None,
                     help="seed of the sampling generator (default: a random one, printed on stderr)")


def _log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _positive(args, *names) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")


def run(args: argparse.Namespace) -> None:
    """Execute one parsed command; raises ConfigError on bad input."""
    if args.command == "inspect":
        from stablemoe_megatron.export.summary import describe, format_summary

        info = describe(args.checkpoint)
        print(json.dumps(info, indent=1) if args.json else format_summary(info))
    elif args.command in ("reshard", "import"):
        from stablemoe_megatron.export.convert import import_export, reshard_checkpoint

        _positive(args, "tp", "pp", "ep")
        convert = reshard_checkpoint if args.command == "reshard" else import_export
        source = args.checkpoint if args.command == "reshard" else args.export_dir
        out = convert(source, args.out, tp=args.tp, pp=args.pp, ep=args.ep, overwrite=args.overwrite, log=_log)
        _log(f"wrote {out} (load it with --load {out}; training resumes with --no-load-optim)")
    elif args.command == "export":
        from stablemoe_megatron.export.exporter import export_checkpoint

        files = {"tokenizer_model": args.tokenizer_model, "vocab_file": args.vocab_file,
                 "merge_file": args.merge_file}
        export_checkpoint(args.checkpoint, args.out, stage=args.stage, dtype=args.dtype,
                          tokenizer_files={k: v for k, v in files.items() if v}, overwrite=args.overwrite, log=_log)
        _log(f"wrote {args.out}")
    elif args.command == "perplexity":
        _run_perplexity(args)
    else:
        _run_generate(args)


def _run_perplexity(args: argparse.Namespace) -> None:
    """Print perplexity's JSON line: the measurement and what it covered (see PERPLEXITY_DOC)."""
    from stablemoe_megatron.export.inference import load, perplexity, read_documents, token_stream

    _positive(args, "batch_size")
    if args.seq_length is not None:
        _positive(args, "seq_length")
    documents = read_documents(args.input)
    model, tokenizer = load(args.export_dir)
    seq = args.seq_length or model.config.run_config.get("model", {}).get("seq_length") \
        or model.config.max_position_embeddings
    if model.config.position_embedding_type == "learned_absolute" and seq > model.config.max_position_embeddings:
        raise ConfigError(f"--seq-length {seq} exceeds the model's {model.config.max_position_embeddings} positions")
    result = perplexity(model, token_stream(tokenizer, documents), seq, args.batch_size)
    print(json.dumps({**result, "documents": len(documents), "input": str(args.input)}))


def _run_generate(args: argparse.Namespace) -> None:
    """Check every flag, then print the prompt and its continuation as one detokenised text."""
    from stablemoe_megatron.export.inference import Sampling, generate_text, load, make_generator

    _positive(args, "max_new_tokens")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        repetition_penalty=args.repetition_penalty)
    sampling.check()
    seed = make_generator(args.seed)[1]
    model, tokenizer = load(args.export_dir)
    if sampling.temperature > 0 and args.seed is None:
        _log(f"sampling seed {seed} (pass --seed {seed} to repeat this output)")
    print(generate_text(model, tokenizer, args.prompt, args.max_new_tokens, sampling=sampling, seed=seed))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: 0 on success, 2 with one message on bad input."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

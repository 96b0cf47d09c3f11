"""Routing report over training runs: fluctuation curves, expert load, distillation agreement, tokens per expert.

    stablemoe-routing-report RUN [RUN ...] [--output DIR] [--labels A B ...] [--top-k 10]
    python -m stablemoe_megatron.cli.routing_report RUN ...      (or: python tools/routing_report.py RUN ...)

RUN names a run trained with ``--routing-probe-interval N``, whose probe history the trainer keeps
in ``<--save>/routing_probe/`` (else beside ``--metrics-file``, else in ``--tensorboard-dir``). Any
of these names it: the run directory (RUN_DIR of the recipes in ``examples/``, whose history is
``RUN_DIR/checkpoints/routing_probe/``; any direct child holding ``routing_probe/`` is found), the
save directory, or the ``routing_probe/`` directory itself. Runs are labelled by their run
directory's name (RUN_DIR's, never ``checkpoints``) unless ``--labels`` is given.

Writes into ``--output`` (default: ``RUN_DIR/routing_report/`` of the first run) and prints the
paths: ``report.md``, ``fluctuation.png`` (every run's curve of the % of probe tokens whose last
expert change comes after x% of training, on one axes, like paper Figure 7), ``load_<run>.png``
per run, and ``agreement.png`` when a run has a distilled router; the plots over iterations mark
the StableMoE stage switch. A name without a history is an error (exit code 2) that says where
the history was looked for.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from stablemoe_megatron.errors import ConfigError

PROG = "stablemoe-routing-report"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run directories (RUN_DIR), their --save directories or their routing_probe/ directories")
    p.add_argument("--output", help="output directory (default: RUN_DIR/routing_report of the first run)")
    p.add_argument("--labels", nargs="+",
                   help="names of the runs in the plots and tables (default: run directory names)")
    p.add_argument("--top-k", type=int, default=10, help="most frequent tokens listed per expert")
    p.add_argument("--tokenizer-model", help="tokenizer file to use instead of the one in the run's config")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.labels and len(args.labels) != len(args.runs):
            raise ConfigError(f"--labels: {len(args.labels)} names for {len(args.runs)} runs")
        if args.top_k < 1:
            raise ConfigError("--top-k must be >= 1")
        from stablemoe_megatron.analysis.report import write_report

        try:
            written = write_report(args.runs, args.output, args.labels, args.top_k, args.tokenizer_model)
        except FileNotFoundError as exc:  # locate.HistoryNotFound, or a history missing one of its files
            raise ConfigError(str(exc)) from exc
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    for name, path in written.items():
        if name != "report":
            print(f"{PROG}: {name}: {path}")
    print(f"{PROG}: report: {written['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

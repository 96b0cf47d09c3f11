"""Routing report over training runs: fluctuation curves, expert load, distillation agreement, tokens per expert.

    stablemoe-routing-report RUN_DIR [RUN_DIR ...] [--output DIR] [--labels A B ...] [--top-k 10]

RUN_DIR is a run trained with ``--routing-probe-interval N`` (its ``--save`` directory, or the
directory of its ``--metrics-file`` / ``--tensorboard-dir``), or its ``routing_probe/`` directory.
Writes into ``--output``: ``report.md``, ``fluctuation.png`` (every run's SPEC-5 curve on one axes,
like paper Figure 7), ``load_<run>.png`` per run, and ``agreement.png`` when a run has a distilled
router. Needs matplotlib (``pip install 'stablemoe-megatron[report]'``).
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from stablemoe_megatron.errors import ConfigError

PROG = "stablemoe-routing-report"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or their routing_probe/)")
    p.add_argument("--output", default="routing_report", help="output directory (default: ./routing_report)")
    p.add_argument("--labels", nargs="+", help="names of the runs in the plots and tables (default: directory names)")
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
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from exc
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    for name, path in written.items():
        print(f"{PROG}: {name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

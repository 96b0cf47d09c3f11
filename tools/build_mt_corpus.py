"""Thin wrapper: `python tools/build_mt_corpus.py --help` (builds the X->English corpus of data/mt/)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stablemoe_megatron.cli.build_mt_corpus import main  # noqa: E402

if __name__ == "__main__":
    main()

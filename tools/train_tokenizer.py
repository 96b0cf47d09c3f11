"""Thin wrapper: `python tools/train_tokenizer.py --help` (same as the `stablemoe-train-tokenizer` console script)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stablemoe_megatron.cli.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    main()

"""Thin wrapper: `python tools/translate.py --help` (translate with an encoder-decoder checkpoint; BLEU/chrF)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stablemoe_megatron.cli.translate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

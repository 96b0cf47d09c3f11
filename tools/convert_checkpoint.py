"""Thin wrapper: `python tools/convert_checkpoint.py --help` (same as the `stablemoe-convert-checkpoint` console script)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stablemoe_megatron.cli.convert_checkpoint import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

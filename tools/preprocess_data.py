"""Thin wrapper: `python tools/preprocess_data.py --help` (same as the `stablemoe-preprocess-data` console script)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stablemoe_megatron.cli.preprocess_data import main  # noqa: E402

if __name__ == "__main__":
    main()

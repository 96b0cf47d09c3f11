"""Thin wrapper: `python tools/reproduce_mt.py [--output runs/reproduce_mt] [--variants ...]` (see stablemoe_megatron/cli/reproduce_mt.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stablemoe_megatron.cli.reproduce_mt import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

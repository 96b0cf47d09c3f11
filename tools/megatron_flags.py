"""Thin wrapper: `python tools/megatron_flags.py [--write]`: the Megatron-LM flag table (docs/MEGATRON_FLAGS.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stablemoe_megatron.cli.megatron_flags import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

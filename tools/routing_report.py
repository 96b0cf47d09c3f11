"""Thin wrapper: `python tools/routing_report.py RUN_DIR [RUN_DIR ...]` (same as the `stablemoe-routing-report` console script)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stablemoe_megatron.cli.routing_report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

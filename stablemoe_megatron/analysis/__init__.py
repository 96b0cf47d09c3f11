"""Routing analysis: the routing probe (fluctuation tracking), expert-load statistics, reports.

* :mod:`.fluctuation` - routing fluctuation as pure numpy: changed fraction, last fluctuation step, the curve.
* :mod:`.load` - per-layer expert-load statistics (min/max/mean/CV, dead experts, max/mean).
* :mod:`.history` - the probe history on disk (``<--save>/routing_probe/``), survives resume.
* :mod:`.locate` - finds a run's history from its run, save or routing_probe directory.
* the routing probe that records the histories is a training callback: :mod:`stablemoe_megatron.training.probe`.
* :mod:`.report` / :mod:`.plots` - PNG plots and a markdown report over one or more runs.
"""
from stablemoe_megatron.analysis.fluctuation import (
    PERCENTS,
    changed_fraction,
    curve_at,
    fluctuation_curve,
    last_fluctuation_steps,
)
from stablemoe_megatron.analysis.load import expert_load_statistics

__all__ = ["PERCENTS", "changed_fraction", "curve_at", "expert_load_statistics", "fluctuation_curve",
           "last_fluctuation_steps"]

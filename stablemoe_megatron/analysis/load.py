"""Expert-load statistics of one MoE layer from its tokens-per-expert counts.

Used by the trainer's logging (:func:`stablemoe_megatron.training.reporting.gather_moe_metrics`)
on the counts merged over ranks and averaged over the log interval's steps, and by the report.
"""
from __future__ import annotations

from typing import Dict, Sequence

import numpy as np


def expert_load_statistics(tokens_per_expert: Sequence[float]) -> Dict[str, float]:
    """Statistics of a load vector [N] (tokens, or token-expert pairs, per expert).

    load_min / load_max / load_mean: tokens per expert; load_cv: population standard deviation
    over the mean (0 = perfectly balanced); load_max_over_mean: the hottest expert's load over
    the mean (what a capacity factor must cover to drop nothing); dead_experts: experts that got
    no token at all. With no tokens the ratios are 0.
    """
    load = np.asarray(tokens_per_expert, dtype=np.float64)
    if load.ndim != 1 or load.size == 0:
        raise ValueError(f"tokens_per_expert must be a non-empty vector, got shape {load.shape}")
    mean = float(load.mean())
    return {
        "load_min": float(load.min()),
        "load_max": float(load.max()),
        "load_mean": mean,
        "load_cv": float(load.std() / mean) if mean > 0 else 0.0,
        "load_max_over_mean": float(load.max() / mean) if mean > 0 else 0.0,
        "dead_experts": int(np.count_nonzero(load == 0)),
    }

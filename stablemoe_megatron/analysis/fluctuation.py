"""Routing fluctuation (how late in training tokens still change expert, paper Figure 7) as pure
numpy functions over a probe history.

A history is ``iterations`` [K] (strictly increasing training steps at which the probe ran) and
``choices`` [K, n] (the expert of each of the n probe tokens at each probe, any integer dtype;
a sentinel such as 255 for "no expert" is just another value).

For each token, its *last fluctuation step* is the last recorded step at which its expert differs
from its expert at the final recorded step (tokens that never differ have none, -1 here). The
curve gives, for x = 0..100, the percentage of probe tokens whose last fluctuation step exceeds
x% of training, ``step * 100 > x * total`` in integers (so 20% of 30 steps is exactly 6).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence

import numpy as np

PERCENTS = np.arange(101)
QUOTED = (20, 50, 80)   # the values the paper quotes
NEVER = -1


def changed_fraction(previous: np.ndarray, current: np.ndarray) -> float:
    """Fraction of tokens whose expert differs between two probes ([n] each)."""
    previous, current = np.asarray(previous), np.asarray(current)
    if previous.shape != current.shape:
        raise ValueError(f"probe shapes differ: {previous.shape} vs {current.shape}")
    return float(np.mean(previous != current)) if current.size else 0.0


def _check(iterations, choices):
    iterations = np.asarray(iterations, dtype=np.int64)
    choices = np.asarray(choices)
    if choices.ndim != 2 or iterations.shape != (choices.shape[0],):
        raise ValueError(f"need iterations [K] and choices [K, n]; got {iterations.shape} and {choices.shape}")
    if iterations.size and np.any(np.diff(iterations) <= 0):
        raise ValueError("probe iterations must be strictly increasing")
    return iterations, choices


def last_fluctuation_steps(iterations: Sequence[int], choices: np.ndarray) -> np.ndarray:
    """[n] int64: each token's last recorded step whose expert differs from the final one, or -1."""
    iterations, choices = _check(iterations, choices)
    if choices.shape[0] == 0:
        return np.full(choices.shape[1], NEVER, dtype=np.int64)
    differs = choices != choices[-1]                      # [K, n]; the final row is all False
    ever = differs.any(axis=0)
    last_index = choices.shape[0] - 1 - np.argmax(differs[::-1], axis=0)
    return np.where(ever, iterations[last_index], NEVER)


def fluctuation_curve(iterations: Sequence[int], choices: np.ndarray, total: Optional[int] = None,
                      percents: Iterable[int] = PERCENTS) -> np.ndarray:
    """[len(percents)] float: % of tokens whose last fluctuation step exceeds x% of ``total``.

    ``total`` is the length of training in steps; default the final recorded step.
    """
    iterations, choices = _check(iterations, choices)
    percents = np.asarray(list(percents), dtype=np.int64)
    if choices.shape[1] == 0 or choices.shape[0] == 0:
        return np.zeros(percents.shape, dtype=np.float64)
    total = int(iterations[-1]) if total is None else int(total)
    steps = last_fluctuation_steps(iterations, choices)
    exceeds = steps[None, :] * 100 > percents[:, None] * total   # integer comparison, no rounding
    return 100.0 * exceeds.mean(axis=1)


def curve_at(curve: Sequence[float], points: Iterable[int] = QUOTED) -> Dict[int, float]:
    """{x: curve value} for a curve over x = 0..100 (the paper quotes 20/50/80%)."""
    return {int(x): float(curve[int(x)]) for x in points}


def history_curves(history, train_iters: Optional[int] = None) -> dict:
    """The ``routing_fluctuation`` record of a :class:`~.history.ProbeHistory`: per (layer, view)
    the curve over x = 0..100 and the 20/50/80% values; "training" is the span up to the final
    recorded probe (the last iteration of a finished run, which the trainer always probes)."""
    iterations = history.iterations
    final = int(iterations[-1]) if iterations.size else 0
    blocks = history.all_choices()  # [K, slots, n]
    layers = []
    for slot, (layer, view) in enumerate(history.layout.slots):
        curve = fluctuation_curve(iterations, blocks[:, slot], total=final)
        entry = {"layer": layer, "view": view}
        entry.update({f"after_{x}": v for x, v in curve_at(curve, QUOTED).items()})
        entry["curve"] = [round(float(v), 4) for v in curve]
        layers.append(entry)
    return {"final_iteration": final, "train_iters": train_iters, "num_probes": int(iterations.size),
            "num_tokens": history.layout.num_tokens, "percents": PERCENTS.tolist(), "layers": layers}


def describe_curves(result: dict) -> str:
    """The end-of-training message: the 20/50/80% values per layer and view."""
    head = (f"routing fluctuation over {result['num_probes']} probes of {result['num_tokens']} tokens "
            f"to iteration {result['final_iteration']}: % of probe tokens whose last expert change is after "
            f"{' / '.join(f'{x}%' for x in QUOTED)} of training")
    if result["num_probes"] < 2:
        head += " (fewer than 2 probes: nothing to compare)"
    lines = [head]
    for entry in result["layers"]:
        values = " / ".join(f"{entry[f'after_{x}']:.1f}%" for x in QUOTED)
        lines.append(f"  layer {entry['layer']} {entry['view']}: {values}")
    return "\n".join(lines)

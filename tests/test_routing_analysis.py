"""Routing analysis without training: fluctuation curves (docs/ALGORITHMS.md §5) on hand-computed
histories, load statistics, the probe history on disk (append, resume truncation, incompatible
layouts), the routed-expert extraction, the logged load statistics, and the report on a synthetic
history."""
import json

import numpy as np
import pytest
import torch

from stablemoe_megatron.analysis import (
    changed_fraction,
    curve_at,
    expert_load_statistics,
    fluctuation_curve,
    last_fluctuation_steps,
)
from stablemoe_megatron.analysis.history import CHOICES, PROBES, Layout, ProbeHistory

# 5 tokens probed at steps 10, 20, 30, 40; last fluctuation steps by hand: -, 10, 20, 30, 20.
ITERS = [10, 20, 30, 40]
CHOICES_ = np.array([[0, 1, 0, 2, 3],
                     [0, 0, 1, 2, 1],
                     [0, 0, 0, 2, 3],
                     [0, 0, 0, 1, 3]])


def test_last_fluctuation_steps_by_hand():
    assert last_fluctuation_steps(ITERS, CHOICES_).tolist() == [-1, 10, 20, 30, 20]


def test_curve_against_hand_computed_values():
    curve = fluctuation_curve(ITERS, CHOICES_)  # training = 40 steps: "after x%" means step > 0.4 x
    assert curve[0] == 80.0          # every token but the constant one changes after step 0
    assert curve[24] == 80.0         # 9.6 < 10
    assert curve[25] == 60.0         # step 10 does not exceed 10
    assert curve[49] == 60.0         # 19.6 < 20
    assert curve[50] == 20.0         # step 20 does not exceed 20: only token 3 (30)
    assert curve[74] == 20.0 and curve[75] == 0.0    # 29.6 < 30; 30 does not exceed 30
    assert curve[100] == 0.0 and len(curve) == 101
    assert np.all(np.diff(curve) <= 0)


def test_curve_with_explicit_training_length_and_quoted_points():
    curve = fluctuation_curve(ITERS, CHOICES_, total=100)  # "x%" = step x
    assert curve_at(curve) == {20: 20.0, 50: 0.0, 80: 0.0}
    assert curve[19] == 60.0 and curve[9] == 80.0 and curve[10] == 60.0


def test_frozen_routing_after_the_switch_gives_a_zero_tail():
    rng = np.random.default_rng(0)
    iterations = np.arange(1, 11) * 100                     # 10 probes over 1000 steps
    stage1 = rng.integers(0, 8, size=(3, 64))               # learning: changes every probe
    frozen = np.repeat(rng.integers(0, 8, size=(1, 64)), 7, axis=0)
    curve = fluctuation_curve(iterations, np.concatenate([stage1, frozen]))
    assert curve[29] > 50 and np.all(curve[30:] == 0)       # last change recorded at step 300


def test_constant_routing_never_fluctuates_and_degenerate_histories():
    assert np.all(fluctuation_curve([5, 10, 15], np.full((3, 7), 2)) == 0)
    assert np.all(fluctuation_curve([5], np.arange(7)[None]) == 0)   # a single probe: nothing to compare
    with pytest.raises(ValueError, match="increasing"):
        fluctuation_curve([10, 10], np.zeros((2, 3)))
    assert changed_fraction([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5


def test_expert_load_statistics():
    s = expert_load_statistics([0.0, 2.0, 6.0, 0.0])
    assert (s["load_min"], s["load_max"], s["load_mean"], s["dead_experts"]) == (0.0, 6.0, 2.0, 2)
    assert s["load_max_over_mean"] == 3.0
    assert s["load_cv"] == pytest.approx(np.sqrt((4 + 0 + 16 + 4) / 4) / 2)
    balanced = expert_load_statistics([5, 5, 5])
    assert balanced["load_cv"] == 0.0 and balanced["load_max_over_mean"] == 1.0
    assert expert_load_statistics([0, 0])["load_cv"] == 0.0


def test_logged_moe_metrics_carry_the_load_statistics():
    from stablemoe_megatron.training.reporting import _merge

    # two DP ranks, 2 steps in the interval: counts are summed over ranks and divided by the steps
    entries = [(0, 0, {3: {"tokens_per_expert": [4, 0, 4, 0], "mean_gate": 0.5}}),
               (0, 1, {3: {"tokens_per_expert": [4, 0, 8, 0], "mean_gate": 0.7}})]
    layer = _merge(entries, steps=2)[3]
    assert layer["tokens_per_expert"] == [4.0, 0.0, 6.0, 0.0]
    assert layer["dead_experts"] == 2 and layer["load_max_over_mean"] == 2.4 and layer["load_min"] == 0.0
    assert layer["dropped_fraction"] == 0.0 and layer["mean_gate"] == pytest.approx(0.6)


def _layout():
    return Layout([2, 5], {2: ["routed"], 5: ["routed", "backbone", "distilled"]}, num_tokens=6, num_experts=4)


def _choices(seed):
    rng = np.random.default_rng(seed)
    return {2: {"routed": rng.integers(0, 4, 6)},
            5: {v: rng.integers(0, 4, 6) for v in ("routed", "backbone", "distilled")}}


def test_history_round_trip_and_resume_truncation(tmp_path):
    layout, tokens = _layout(), np.arange(6)
    history, note = ProbeHistory.open(tmp_path / "routing_probe", layout, tokens, 0, {"router": "stablemoe"})
    assert note is None and history.previous(2, "routed") is None
    written = {it: _choices(it) for it in (10, 20, 30)}
    for it, choices in written.items():
        history.append({"iteration": it, "stage": 1, "layers": []}, choices)
    assert (tmp_path / "routing_probe" / CHOICES).stat().st_size == 3 * layout.block_bytes == 3 * 4 * 6
    assert np.array_equal(history.previous(5, "distilled"), written[30][5]["distilled"])

    loaded = ProbeHistory.load(tmp_path)                     # the run directory works too
    assert loaded.iterations.tolist() == [10, 20, 30] and loaded.meta["router"] == "stablemoe"
    assert np.array_equal(loaded.choices(5, "backbone"), np.stack([written[i][5]["backbone"] for i in (10, 20, 30)]))

    # resume at iteration 25 (a crash after the probe at 30): the probe at 30 is dropped
    resumed, note = ProbeHistory.open(tmp_path / "routing_probe", layout, tokens, 25)
    assert "kept 2 probes" in note and "dropped 1" in note
    assert resumed.iterations.tolist() == [10, 20]
    assert np.array_equal(resumed.previous(2, "routed"), written[20][2]["routed"])
    resumed.append({"iteration": 30, "stage": 2, "layers": []}, written[10])
    again = ProbeHistory.load(tmp_path / "routing_probe")
    assert [json.loads(x)["stage"] for x in (tmp_path / "routing_probe" / PROBES).read_text().splitlines()] == [1, 1, 2]
    assert np.array_equal(again.choices(2)[-1], written[10][2]["routed"])
    with pytest.raises(ValueError, match="not after"):
        resumed.append({"iteration": 30, "stage": 2, "layers": []}, written[10])


def test_a_fresh_start_or_other_probe_tokens_start_a_new_history(tmp_path):
    layout, path = _layout(), tmp_path / "routing_probe"
    history, _ = ProbeHistory.open(path, layout, np.arange(6), 0)
    history.append({"iteration": 5, "stage": 1, "layers": []}, _choices(1))
    fresh, note = ProbeHistory.open(path, layout, np.arange(6), 0)   # a new run in the same directory
    assert fresh.records == [] and (path / CHOICES).stat().st_size == 0 and "earlier run" in note
    assert ProbeHistory.load(tmp_path / "routing_probe.prev").iterations.tolist() == [5]
    fresh.append({"iteration": 5, "stage": 1, "layers": []}, _choices(1))
    other, note = ProbeHistory.open(path, layout, np.arange(6) + 1, 5)   # resumed with other probe tokens
    assert other.records == [] and "other probe tokens" in note
    assert np.array_equal(ProbeHistory.load(path).tokens, np.arange(6) + 1)


def test_in_memory_history_and_wide_expert_ids():
    layout = Layout([1], {1: ["routed"]}, num_tokens=3, num_experts=300)
    assert layout.dtype == np.int16 and layout.none_value == 32767
    history, _ = ProbeHistory.open(None, layout, np.arange(3), 0)
    history.append({"iteration": 1, "stage": 1, "layers": []}, {1: {"routed": np.array([299, 0, 32767])}})
    history.append({"iteration": 2, "stage": 1, "layers": []}, {1: {"routed": np.array([299, 1, 5])}})
    assert history.choices(1).tolist() == [[299, 0, 32767], [299, 1, 5]]


def test_routed_expert_is_the_highest_gate_or_none():
    from stablemoe_megatron.training.probe import routed_expert_ids
    from stablemoe_megatron.moe.router_base import RoutingDecision

    # expert choice: token 0 picked by experts 1 (0.2) and 2 (0.5), token 1 by nobody, token 2 by expert 0
    decision = RoutingDecision(torch.tensor([0, 0, 2]), torch.tensor([1, 2, 0]), torch.tensor([0.2, 0.5, 0.9]),
                               torch.zeros(()))
    assert routed_expert_ids(decision, 3, 4, 255).tolist() == [2, 255, 0]


def write_synthetic_history(directory, stages=(1, 1, 1), meta=None) -> ProbeHistory:
    """A StableMoE-like history in ``directory`` (a routing_probe/ directory): MoE layer 3, 2 experts,
    8 probe tokens with ids 7 7 7 9 9 4 4 4, one probe every 10 iterations in the given stages.
    Tokens 5 and 6 change expert once, at the probe of iteration 10; nothing changes after it."""
    layout = Layout([3], {3: ["routed", "backbone", "distilled"]}, num_tokens=8, num_experts=2)
    history, _ = ProbeHistory.open(directory, layout, np.array([7, 7, 7, 9, 9, 4, 4, 4]), 0, meta)
    for k, stage in enumerate(stages):
        routed = [0, 0, 0, 1, 1, 1, 1, 0] if k == 0 else [0, 0, 0, 1, 1, 0, 0, 0]
        views = {"routed": np.array(routed), "backbone": np.array(routed), "distilled": np.zeros(8, int)}
        layers = [{"layer": 3, "changed_fraction": 0.0, "distill_agreement": 0.5, "tokens_per_expert": [5, 3]}]
        history.append({"iteration": 10 * (k + 1), "stage": stage, "layers": layers}, {3: views})
    return history


def test_report_on_a_synthetic_history_without_a_tokenizer(tmp_path):
    from stablemoe_megatron.analysis.report import write_report
    from stablemoe_megatron.cli.routing_report import main

    write_synthetic_history(tmp_path / "run" / "routing_probe")
    written = write_report([tmp_path / "run"], tmp_path / "out")
    assert {"fluctuation", "agreement", "load_run", "report"} <= set(written)
    text = written["report"].read_text()
    # by hand: tokens 5, 6 last differ at step 10 of 30 -> 25% of tokens change after 20%, none after 50%
    assert "| run | 3 | routed | 25.0 | 0.0 | 0.0 |" in text
    assert "| 0 | 6 | `7` (3), `4` (3) |" in text and "| 1 | 2 | `9` (2) |" in text
    assert "token ids shown" in text
    assert main([str(tmp_path / "missing"), "--output", str(tmp_path / "o2")]) == 2

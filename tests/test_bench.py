"""Smoke test of the benchmark scripts' correctness checks (bench/): no timing assertions.

* bench/moe_layer.py: our switch layer computes megatron-core's TopKRouter + allgather layer
  (outputs, input and weight gradients), and one tiny timing round of every variant produces the
  report's structure, with the device-to-host sync counts of the default settings (one dispatcher
  copy per call: the token shuffle and StableMoE's capacity need the device's counts).
* bench/common.py HostSyncCounter: counts what would block a GPU, not host-side work.
* bench/step_time.py: the equal-FLOPs dense model equals the routed 1-expert model, one step runs.
"""
import os
import sys

import pytest
import torch

from distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_path():
    if REPO not in sys.path:
        sys.path.insert(0, REPO)


def _moe_layer_smoke():
    _bench_path()
    from bench import moe_layer

    sizes = dict(moe_layer.PRESETS["smoke"])
    result = moe_layer.run(sizes, list(moe_layer.ALL_ROUTERS), repeats=1, warmup=0, inner=1, verbose=False)
    result.pop("machine")
    return result, moe_layer.report(result)


def test_moe_layer_bench_checks_and_one_round():
    result, text = run_distributed(_moe_layer_smoke, world_size=1, timeout=120)[0]
    assert result["check_passed"], result["check"]
    for label, diffs in result["check"].items():
        assert set(diffs) >= {"output", "input grad", "router grad"}, label
        assert all(v <= 1e-5 for v in diffs.values()), (label, diffs)
    assert any(key.startswith("expert ") for key in result["check"]["with experts"])
    variants = ["megatron", "switch", "stablemoe-s1", "stablemoe-s2", "stablemoe-s2-noids", "hash", "base", "expert-choice"]
    for measure in ("dispatch", "layer"):
        rows = result["measures"][measure]
        assert list(rows) == variants
        for name, row in rows.items():
            for mode in ("fwd", "fwd+bwd"):
                assert row[mode]["median_s"] > 0 and len(row[mode]["samples_s"]) == 1
            assert rows["megatron"]["fwd"]["ratio_to_megatron"][1] == 1.0
        # dispatcher copies: one per call for every router of ours with the default settings, even
        # with host token ids: the token shuffle (on by default; on one rank a local permutation)
        # moves the rows away from the host copy of their ids, and StableMoE's default capacity (2)
        # keeps tokens by their gates on the device. The copy-free host-id path (--no-moe-token-shuffle,
        # no capacity) is tested in test_moe_layer.py.
        assert all(rows[name]["dispatcher_d2h"] == 1 for name in variants if name != "megatron"), rows
        assert rows["megatron"]["dispatcher_d2h"] is None
        # megatron's allgather path: the tokens-per-expert copy and two masked_selects
        assert rows["megatron"]["syncs"] >= 3, rows["megatron"]["sync_ops"]
        assert rows["switch"]["syncs"] >= 1
    assert "routing + dispatch + combine" in text and "goal: stage-2 StableMoE" in text


def test_host_sync_counter_counts_device_blocking_ops_only():
    _bench_path()
    from bench.common import count_host_syncs

    host = torch.arange(8)
    dev = torch.arange(8) * 2  # stands for a device tensor
    with count_host_syncs([host]) as counter:
        host.tolist()
        int(host.sum())
        torch.bincount(host[host > 3], minlength=8)  # all host: free
        moved = host.to(torch.device("cpu"))  # host -> device copy: no sync
        (moved + dev).sum()
        assert counter.count == 0, counter.events
        dev.tolist()
        dev.nonzero()
        dev[dev > 4]
        torch.bincount(dev)
        bool((dev > 0).any())
        dev.repeat_interleave(dev)
        dev.repeat_interleave(dev, output_size=56)
        on_host = dev.cpu()
        on_host.tolist()  # already on the host
    assert counter.events == ["tolist", "nonzero", "bool-mask index", "bincount", "bool", "repeat_interleave", "cpu"]


def _step_time_smoke():
    _bench_path()
    from bench import step_time

    size = dict(step_time.SIZES["tiny"], layers=2, hidden=32, ffn=64, heads=2, seq=16, micro=2, vocab=128)
    result = step_time.run(size, ["dense-equal", "stablemoe-s1", "stablemoe-s2", "dense"], repeats=1, warmup=1,
                           verbose=False)
    result.pop("machine")
    return result, step_time.report(result)


def test_step_time_bench_dense_equivalent_and_one_step():
    result, text = run_distributed(_step_time_smoke, world_size=1, timeout=120)[0]
    diff = result["checks"]["dense-equal vs routed 1-expert model, max |loss diff|"]
    assert diff <= 1e-5, diff
    v = result["variants"]
    assert list(v) == ["dense-equal", "stablemoe-s1", "stablemoe-s2", "dense"]
    # equal active FLOPs (up to the router's matmul), the dense model without the block has fewer
    assert v["stablemoe-s2"]["train_flops_per_token"] == pytest.approx(v["dense-equal"]["train_flops_per_token"], rel=0.02)
    assert v["dense"]["train_flops_per_token"] < v["dense-equal"]["train_flops_per_token"]
    assert v["stablemoe-s2"]["params"]["expert"] > v["dense-equal"]["params"]["expert"] > 0
    assert all(x["median_s"] > 0 for x in v.values())
    assert "goal: stablemoe-s2 step" in text

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

import types

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
    variants = ["megatron", "switch", "stablemoe-s1", "stablemoe-s2", "stablemoe-s2-noids", "stablemoe-s2-dropless",
                "hash", "base", "expert-choice"]
    for measure in ("dispatch", "layer"):
        rows = result["measures"][measure]
        assert list(rows) == variants
        for name, row in rows.items():
            for mode in ("fwd", "fwd+bwd"):
                assert row[mode]["median_s"] > 0 and len(row[mode]["samples_s"]) == 1
            assert rows["megatron"]["fwd"]["ratio_to_megatron"][1] == 1.0
        # with the recipe's defaults (token shuffle, StableMoE's capacity 2) on one rank, token-id
        # routing with host ids (stage 2, hash) makes no host sync at all: the local shuffle keeps the
        # host ids and the kept counts are min(n_i, capacity); routing that depends on the hidden
        # states copies its counts once per call
        copy_free = {"stablemoe-s2", "stablemoe-s2-dropless", "hash"}
        for name in variants[1:]:
            assert rows[name]["dispatcher_d2h"] == (0 if name in copy_free else 1), (name, rows[name])
            if name in copy_free:
                assert rows[name]["syncs"] == 0, (name, rows[name]["sync_ops"])
        assert rows["megatron"]["dispatcher_d2h"] is None
        # megatron's allgather path: the tokens-per-expert copy and two masked_selects
        assert rows["megatron"]["syncs"] >= 3, rows["megatron"]["sync_ops"]
        assert rows["switch"]["syncs"] >= 1
    assert "routing + dispatch + combine" in text and "goal: stablemoe-s2 routing + dispatch" in text
    assert list(result["memory"]) == variants and all(m["peak_bytes"] > 0 for m in result["memory"].values())
    assert result["memory"]["megatron"]["ratio"] == 1.0 and "goal: peak memory of our layer" in text


def test_profile_attribution_and_peak_memory_against_known_work():
    """bench/profiling.py: forward ops in a range and their backward count there, the optimizer's
    step as optimizer, the rest as other; the CPU peak of known allocations."""
    _bench_path()
    from torch.profiler import ProfilerActivity, profile

    from bench.profiling import attribute, categorized, peak_memory

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router, self.dispatcher, self.shuffle = torch.nn.Linear(64, 64), None, None
            self.experts = torch.nn.Linear(64, 64)

    class Dispatcher:
        def dispatch(self, x):
            return x * 1.0

        def combine(self, x):
            return x + 0.0

    layer = Layer()
    layer.dispatcher = Dispatcher()
    model = types.SimpleNamespace(moe_layers=[layer])
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(256, 64)
    with categorized(model, [optimizer]), profile(activities=[ProfilerActivity.CPU]) as prof:
        hidden = torch.tanh(x)  # other
        y = layer.dispatcher.combine(layer.experts(layer.dispatcher.dispatch(layer.router(hidden))))
        y.pow(2).sum().backward()  # pow / sum: other; the Linear backwards: routing and experts
        optimizer.step()
    events = prof.events()
    times = attribute(events)
    assert abs(sum(times.values()) - sum(e.self_cpu_time_total for e in events if not e.name.startswith("bench::"))) < 1e-3
    assert all(times[c] > 0 for c in ("routing", "dispatch", "experts", "optimizer", "other")), times
    # every backward node of a Linear (AddmmBackward0) counts where its forward ran
    by_seq = {e.sequence_nr: e for e in events if e.name == "aten::addmm"}
    backward = [e for e in events if e.name.startswith("autograd::engine::evaluate_function: AddmmBackward")]
    assert len(backward) == 2 and all(e.sequence_nr in by_seq for e in backward)
    assert "forward" not in vars(layer.router) and "step" not in vars(optimizer)  # unwrapped after

    def allocate():
        a = torch.ones(1_000_000)  # 4 MB
        b = torch.ones(2_000_000)  # 8 MB, both alive: 12 MB peak
        del a, b
        torch.ones(500_000)  # 2 MB after they are freed
    peak = peak_memory(allocate)
    assert 12_000_000 <= peak <= 12_100_000, peak


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
                           verbose=False, profile_steps=1)
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
    assert "goal: stablemoe-s2 step" in text and "not assessed (< 4,096 tokens per step)" in text
    profiles = {name: x["profile_ms"] for name, x in v.items()}
    for name, ms in profiles.items():
        assert ms["total"] == pytest.approx(sum(ms[c] for c in ("routing", "dispatch", "experts", "optimizer", "other")))
        assert ms["optimizer"] > 0 and ms["other"] > 0, (name, ms)
    for name in ("stablemoe-s1", "stablemoe-s2"):
        assert all(profiles[name][c] > 0 for c in ("routing", "dispatch", "experts")), (name, profiles[name])
    assert profiles["dense-equal"]["routing"] == profiles["dense-equal"]["dispatch"] == 0 < profiles["dense-equal"]["experts"]
    assert profiles["dense"]["experts"] == 0 and "torch.profiler breakdown" in text

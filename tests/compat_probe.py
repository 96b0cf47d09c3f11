"""Run one megatron-core call that needs a cpu_compat patch; print a JSON verdict.

    python tests/compat_probe.py PATCH [--skip PATCH ...] [--pretend-cuda]

Used by test_cpu_compat.py in a fresh interpreter, because patches are process-wide and cannot
be un-applied: each probe shows that its megatron-core call fails when only its patch is skipped.
"""
import argparse
import json
import os
import sys
import traceback

import torch


def init_world_of_one():
    from megatron.core import parallel_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("PROBE_PORT", "29533"))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()


def probe_cuda_device_to_cpu():
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(4)
    norm = get_grad_norm_fp32([torch.full((4,), 2.0)])
    return {"mask_device": str(mask.device), "mask": mask.tolist(), "norm": float(norm)}


def probe_current_device_is_cpu():
    from megatron.core.utils import GlobalMemoryBuffer

    tensor = GlobalMemoryBuffer().get_tensor([2, 3], torch.float32, "probe")
    return {"device": str(tensor.device), "shape": list(tensor.shape)}


def probe_synchronize_is_noop():
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    buckets = [("f", "k", ([], [("item", torch.ones(2))]))]
    out = FileSystemWriterAsync.preload_tensors(buckets, non_blocking=True)
    return {"preloaded": out[0][2][1][0][1].tolist()}


def probe_cpu_rng_tracker():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(7)
    default_before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():  # the tensor-model-parallel stream: seed 7 + 2718 + tp_rank
        first = torch.rand(3)
    with get_cuda_rng_tracker().fork():
        second = torch.rand(3)
    untouched = bool(torch.equal(default_before, torch.get_rng_state()))
    torch.manual_seed(7 + 2718)
    expected = torch.rand(6)
    return {"stream": torch.cat([first, second]).tolist(), "expected": expected.tolist(),
            "default_untouched": untouched}


def probe_moe_utils_te_names():
    from megatron.core.transformer.moe.moe_utils import router_gating_linear

    torch.manual_seed(0)
    inp, weight = torch.randn(5, 8), torch.randn(4, 8)
    logits = router_gating_linear(inp, weight, None, torch.float32)
    return {"max_error": float((logits - inp @ weight.t()).abs().max())}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("probe")
    parser.add_argument("--skip", action="append", default=[])
    parser.add_argument("--pretend-cuda", action="store_true")
    args = parser.parse_args()
    if args.pretend_cuda:
        torch.cuda.is_available = lambda: True
    from stablemoe_megatron import cpu_compat

    applied = cpu_compat.apply(skip=args.skip)
    init_world_of_one()
    try:
        result = {"ok": True, "value": globals()[f"probe_{args.probe}"]()}
    except BaseException as exc:  # noqa: BLE001 - the verdict is the output
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    result["applied"] = applied
    result["current_device_patched"] = torch.cuda.current_device is cpu_compat._cpu_current_device
    print(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

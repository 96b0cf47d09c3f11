"""Each cpu_compat patch is needed (its megatron-core call fails without it) and works."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stablemoe_megatron import cpu_compat
from stablemoe_megatron.runtime import free_port

PROBE = str(Path(__file__).with_name("compat_probe.py"))


def _probe(name, *extra):
    env = dict(os.environ, PROBE_PORT=str(free_port()), PYTHONWARNINGS="ignore")
    out = subprocess.run([sys.executable, PROBE, name, *extra], capture_output=True, text=True,
                         timeout=120, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[-1])


@pytest.mark.parametrize("patch", sorted(cpu_compat.PATCHES))
def test_patch_is_needed(patch):
    verdict = _probe(patch, "--skip", patch)
    assert patch not in verdict["applied"]
    assert not verdict["ok"], f"{patch}: the megatron call worked without the patch: {verdict}"
    expected = "te_general_gemm" if patch == "moe_utils_te_names" else "cuda"
    assert expected in verdict["error"].lower() or expected in verdict["error"], verdict["error"]


def test_patches_work_together():
    mask = _probe("cuda_device_to_cpu")
    assert mask["ok"], mask
    assert mask["value"]["mask_device"] == "cpu"
    assert mask["value"]["mask"] == torch.triu(torch.ones(4, 4), diagonal=1).bool().tolist()
    assert mask["value"]["norm"] == pytest.approx(4.0)  # ||(2,2,2,2)||_2

    buffer = _probe("current_device_is_cpu")
    assert buffer["ok"] and buffer["value"] == {"device": "cpu", "shape": [2, 3]}

    sync = _probe("synchronize_is_noop")
    assert sync["ok"] and sync["value"]["preloaded"] == [1.0, 1.0]

    rng = _probe("cpu_rng_tracker")
    assert rng["ok"], rng
    # Two forks continue ONE named stream seeded like megatron's model-parallel stream ...
    assert rng["value"]["stream"] == pytest.approx(rng["value"]["expected"])
    # ... and leave the default generator where it was.
    assert rng["value"]["default_untouched"]
    assert set(rng["applied"]) == set(cpu_compat.PATCHES)

    gating = _probe("moe_utils_te_names")
    assert gating["ok"] and gating["value"]["max_error"] < 1e-5, gating


def test_never_applied_when_cuda_is_present():
    verdict = _probe("current_device_is_cpu", "--pretend-cuda")
    assert verdict["applied"] == []
    assert not verdict["current_device_patched"]


def test_device_mode_redirects_cuda_arguments():
    with cpu_compat.CudaDeviceToCpuMode():
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.tensor([1], device=0).device.type == "cpu"
        assert torch.empty_like(torch.ones(2), device=torch.device("cuda", 0)).device.type == "cpu"
        x = torch.ones(2)
        assert x.cuda() is x
        assert x.to("cuda").device.type == "cpu"
        assert x.to(torch.float64).dtype == torch.float64  # non-device arguments untouched
        assert x.type() == "torch.cuda.FloatTensor"  # what megatron's clip_grads asserts
        assert x.type(torch.float64).dtype == torch.float64

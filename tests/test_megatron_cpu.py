"""megatron-core GPT on CPU under gloo: tensor and pipeline parallel runs equal a single process.

Weights come from one single-process model and are copied into the parallel models through
megatron's own sharded_state_dict mapping, so the comparison is exact up to float rounding.
"""
import pytest
import torch

from megatron_cases import BATCH, SEQ, batch, build_gpt, positions, tiny_config
from distributed import (
    global_tensors,
    load_global_tensors,
    max_abs_diff_to_global,
    run_distributed,
)

TOL = 1e-5


def _reference(seed=0):
    """Single process: weights, per-token losses and grads of a fixed batch."""
    model = build_gpt(tiny_config())
    tokens, labels = batch(seed)
    losses = model(tokens, positions(), None, labels=labels)
    losses.mean().backward()
    return global_tensors(model), losses.detach(), global_tensors(model, grads=True)


def _tensor_parallel(weights, ref_grads, sequence_parallel):
    model = build_gpt(tiny_config(sequence_parallel=sequence_parallel))
    assert load_global_tensors(model, weights) > 0
    tokens, labels = batch(0)
    losses = model(tokens, positions(), None, labels=labels)
    losses.mean().backward()
    if sequence_parallel:  # what megatron's finalize_model_grads does for SP-replicated params
        from megatron.core import parallel_state as ps

        for param in model.parameters():
            if getattr(param, "sequence_parallel", False):
                torch.distributed.all_reduce(param.grad, group=ps.get_tensor_model_parallel_group())
    grad_diff, compared = max_abs_diff_to_global(model, ref_grads, grads=True)
    return losses.detach(), grad_diff, len(compared)


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_reference, world_size=1)[0]


def test_tensor_parallel_2_equals_single_process(reference):
    weights, ref_losses, ref_grads = reference
    results = run_distributed(_tensor_parallel, world_size=2, tp=2, args=(weights, ref_grads, False))
    for losses, grad_diff, compared in results:
        assert compared == len(ref_grads)
        assert (losses - ref_losses).abs().max().item() <= TOL
        assert grad_diff <= TOL


def _pipeline_step(weights, num_microbatches):
    """Run megatron's forward-backward schedule (PP=1 or 2); return last-stage losses and grads."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = build_gpt(tiny_config())
    load_global_tensors(model, weights)
    micro = BATCH // num_microbatches
    tokens, labels = batch(0)
    chunks = iter(zip(tokens.split(micro), labels.split(micro)))

    def forward_step(data_iterator, model):
        tok, lab = next(data_iterator)
        losses = model(tok, positions(micro), None, labels=lab)
        return losses, lambda out: (out.mean(), {"loss": out.mean().detach()})

    stats = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=chunks, model=[model],
        num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=micro, forward_only=False,
    )
    # Embedding and output weights are untied here, so no embedding-group all-reduce is needed.
    # Each stage fills its own layers of the global tensors (zeros elsewhere): sum the stages.
    full_grads = {}
    for rank_grads in _gather_objects(global_tensors(model, grads=True)):
        for key, grad in rank_grads.items():
            full_grads[key] = full_grads[key] + grad if key in full_grads else grad
    losses = [s["loss"] for s in stats] if ps.is_pipeline_last_stage() else None
    return losses, full_grads


def _gather_objects(obj):
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def test_pipeline_parallel_2_schedule_equals_single_process(reference):
    weights = reference[0]
    ref_losses, ref_grads = run_distributed(_pipeline_step, world_size=1, args=(weights, 2))[0]
    results = run_distributed(_pipeline_step, world_size=2, pp=2, args=(weights, 2))
    losses, grads = results[1]  # the last stage reports losses; grads are gathered everywhere
    assert results[0][0] is None and len(losses) == 2
    for got, want in zip(losses, ref_losses):
        assert abs(got.item() - want.item()) <= TOL
    assert set(grads) == set(ref_grads)
    worst = max((grads[k] - ref_grads[k]).abs().max().item() for k in ref_grads)
    assert worst <= TOL, worst


def _save_checkpoint(weights, ckpt_dir):
    from megatron.core import dist_checkpointing

    model = build_gpt(tiny_config())
    load_global_tensors(model, weights)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    return sorted(p.name for p in __import__("pathlib").Path(ckpt_dir).iterdir())


def _load_checkpoint(weights, ckpt_dir):
    from megatron.core import dist_checkpointing

    torch.manual_seed(999)  # a different initialisation, overwritten by the load
    model = build_gpt(tiny_config())
    before, _ = max_abs_diff_to_global(model, weights)
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state)
    after, compared = max_abs_diff_to_global(model, weights)
    return before, after, len(compared)


def test_dist_checkpoint_saved_at_world_2_loads_at_world_2_and_resharded_at_world_1(reference, tmp_path):
    weights = reference[0]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    ckpt = str(ckpt)
    files = run_distributed(_save_checkpoint, world_size=2, tp=2, args=(weights, ckpt))[0]
    assert "metadata.json" in files and any(f.endswith(".distcp") for f in files)
    for world, tp in ((2, 2), (1, 1)):
        for before, after, compared in run_distributed(_load_checkpoint, world_size=world, tp=tp,
                                                       args=(weights, ckpt)):
            assert before > 1e-3  # the fresh model really differed
            assert after == 0.0 and compared == len(weights)

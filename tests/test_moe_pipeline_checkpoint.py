"""MoE models under pipeline parallelism (megatron's schedule) and through dist_checkpointing.

Pipeline: a single-process model defines the weights; megatron's forward-backward schedule
(2 micro-batches) at PP=2 must give the losses and every gradient of the same schedule at PP=1.
The paper layout with ``positions="top"`` puts the MoE block on the last stage only, the Megatron
layout has an MoE MLP on each stage; the hash router (routing = table[token id]) makes it sharp
that the token ids reach an MoE layer on a non-first stage.

Checkpoints: a model saved with megatron's dist_checkpointing at EP=2 or TP=2+SP (world 2) loads
into a world-1 model with every tensor equal, including the hash router's table and the Expert
Choice thresholds (buffers).
"""
import pathlib

import pytest
import torch

from moe_cases import BATCH, EXPERTS, SEQ, VOCAB, batch, build, positions
from distributed import (
    global_tensors,
    load_global_tensors,
    max_abs_diff_to_global,
    run_distributed,
)

TOL = 1e-5


def _reset_aux_scale():
    """megatron's schedule sets the (process-global) aux-loss backward scale to 1/num_microbatches;
    the worker processes are reused by other tests, so put the default (1.0) back."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None


def _gather_objects(obj):
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------
# 1. pipeline parallelism
# ----------------------------------------------------------------------------------------------
def _reference_weights(case):
    return global_tensors(build(**case))


def _pipeline_step(case, weights, num_microbatches):
    """megatron's forward-backward schedule at this PP size; last-stage losses, summed grads,
    and what the routers of this stage saw."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    _reset_aux_scale()
    model = build(**case)
    assert load_global_tensors(model, weights) > 0
    seen = []  # (token ids the router got, experts it chose, the micro-batch's real ids)
    for layer in model.moe_layers:
        layer.router.register_forward_hook(
            lambda module, args, out, n=layer.layer_number: seen.append(
                (n, args[0].token_ids.clone(), out.expert_index.clone())))
    micro = BATCH // num_microbatches
    tokens, labels = batch(0)
    chunks = list(zip(tokens.split(micro), labels.split(micro)))
    fed = []

    def forward_step(data_iterator, model):
        tok, lab = next(data_iterator)
        fed.append(tok)
        losses = model(tok, positions(micro), None, labels=lab)
        return losses, lambda out: (out.mean(), {"loss": out.mean().detach()})

    try:
        stats = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(chunks), model=[model],
            num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=micro, forward_only=False)
    finally:
        _reset_aux_scale()
    full_grads = {}
    for rank_grads in _gather_objects(global_tensors(model, grads=True)):
        for key, grad in rank_grads.items():
            full_grads[key] = full_grads[key] + grad if key in full_grads else grad
    # each router call i saw micro-batch i (sequence-major ids, as the hidden rows)
    per_layer = {}
    for n, ids, experts in seen:
        per_layer.setdefault(n, []).append((ids, experts))
    routed = {n: [(torch.equal(ids, tok.t().reshape(-1)), experts) for (ids, experts), tok in zip(calls, fed)]
              for n, calls in per_layer.items()}
    hash_tables = {layer.layer_number: layer.router.table.clone() for layer in model.moe_layers
                   if hasattr(layer.router, "table")}
    losses = [s["loss"] for s in stats] if ps.is_pipeline_last_stage() else None
    return dict(losses=losses, grads=full_grads, routed=routed, fed=fed, hash_tables=hash_tables,
                first_stage=ps.is_pipeline_first_stage())


# Without the token shuffle (on by default): the checks compare the rows each router got with the
# micro-batch's sequence-major ids, which the shuffle permutes.
_NO_SHUFFLE = dict(moe_options=dict(token_shuffle=False))
PIPELINE_CASES = {
    "paper-top-stablemoe": dict(router="stablemoe", positions="top", **_NO_SHUFFLE),
    "paper-top-hash": dict(router="hash", positions="top", **_NO_SHUFFLE),
    "paper-top-switch-capacity": dict(router="switch", positions="top", capacity=1.0, **_NO_SHUFFLE),
    "megatron-switch": dict(router="switch", layout="megatron", **_NO_SHUFFLE),
    "megatron-hash": dict(router="hash", layout="megatron", **_NO_SHUFFLE),
}


@pytest.mark.parametrize("name", sorted(PIPELINE_CASES))
def test_pipeline_parallel_2_equals_single_process(name):
    case = PIPELINE_CASES[name]
    weights = run_distributed(_reference_weights, world_size=1, args=(case,))[0]
    ref = run_distributed(_pipeline_step, world_size=1, args=(case, weights, 2))[0]
    stages = run_distributed(_pipeline_step, world_size=2, pp=2, args=(case, weights, 2))
    first, last = stages
    assert first["first_stage"] and not last["first_stage"]
    assert first["losses"] is None and len(last["losses"]) == len(ref["losses"]) == 2
    loss_diff = max(abs(a.item() - b.item()) for a, b in zip(last["losses"], ref["losses"]))
    assert loss_diff <= TOL, loss_diff
    assert set(last["grads"]) == set(ref["grads"])
    grad_diff = max((last["grads"][k] - ref["grads"][k]).abs().max().item() for k in ref["grads"])
    assert grad_diff <= TOL, grad_diff
    # gradients really reached the MoE parts on both stages' share of the model
    assert any("experts" in k and ref["grads"][k].abs().max() > 0 for k in ref["grads"])

    # where the MoE layers live, and that their routers got the micro-batch's own ids
    layers = {n for stage in stages for n in stage["routed"]}
    assert layers == set(ref["routed"])
    if case.get("layout") == "megatron":
        assert set(first["routed"]) == {1} and set(last["routed"]) == {3}  # --moe-layer-freq 2: layers 1, 3
    else:
        assert first["routed"] == {} and set(last["routed"]) == {4}  # MoE block on the last stage only
    for stage in stages:
        for n, calls in stage["routed"].items():
            assert len(calls) == 2 and all(ok for ok, _ in calls), (n, stage["first_stage"])
            for (_, experts), (_, ref_experts) in zip(calls, ref["routed"][n]):
                assert torch.equal(experts, ref_experts)
            if case["router"] == "hash":  # routing is table[token id]: the right ids arrived
                table = stage["hash_tables"][n]
                for (_, experts), tok in zip(calls, stage["fed"]):
                    assert torch.equal(experts, table[tok.t().reshape(-1)])


# ----------------------------------------------------------------------------------------------
# 7. dist_checkpointing: save at EP=2 or TP=2+SP (world 2), load at world 1
# ----------------------------------------------------------------------------------------------
CHECKPOINT_CASES = {
    "stablemoe-wordemb-paper": dict(router="stablemoe", distill="wordemb"),
    "switch-megatron": dict(router="switch", layout="megatron"),
    # the training forward with host ids checks their routing: no token shuffle (it drops the host ids)
    "hash-megatron": dict(router="hash", layout="megatron", **_NO_SHUFFLE),
    "expert-choice-paper": dict(router="expert-choice"),
}


def _checkpoint_reference(case):
    """Weights (and buffers) of a single-process model whose buffers differ from a fresh model's."""
    _reset_aux_scale()
    model = build(**case)
    for layer in model.moe_layers:
        router = layer.router
        if case["router"] == "hash":  # a table no freshly built router has
            gen = torch.Generator().manual_seed(100 + layer.layer_number)
            router.set_table(torch.randint(0, EXPERTS, (VOCAB,), generator=gen))
    if case["router"] == "expert-choice":  # thresholds come from training forwards
        tokens, labels = batch(0)
        model(tokens, positions(), None, labels=labels).mean().backward()
        model.finalize_moe_step()
    return global_tensors(model)


def _save_checkpoint(case, weights, ckpt_dir):
    from megatron.core import dist_checkpointing

    model = build(**case)
    assert load_global_tensors(model, weights) > 0
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)
    return sorted(p.name for p in pathlib.Path(ckpt_dir).iterdir())


def _load_checkpoint(case, weights, ckpt_dir):
    from megatron.core import dist_checkpointing

    torch.manual_seed(999)  # a different initialisation, overwritten by the load
    model = build(**case)
    before, _ = max_abs_diff_to_global(model, weights)
    fresh = global_tensors(model)
    buffers = [k for k in weights if k.endswith(("router.table", "router.thresholds", "thresholds_initialized"))]
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state)
    after, compared = max_abs_diff_to_global(model, weights)
    loaded = global_tensors(model)
    out = dict(before=before, after=after, compared=compared, buffers={
        k: (not torch.equal(fresh[k], weights[k]), torch.equal(loaded[k], weights[k])) for k in buffers})
    tokens, labels = batch(1)
    if case["router"] == "hash":
        # the host copy of the table follows the load: host-id routing gives the same result
        for layer in model.moe_layers:
            layer.keep_last_decision = True
        with_host = model(tokens, positions(), None, labels=labels, host_token_ids=tokens)
        experts = [layer.last_decision.expert_index for layer in model.moe_layers]
        without = model(tokens, positions(), None, labels=labels)
        tables = [weights[k] for k in sorted(weights) if k.endswith("router.table")]
        out["hash_routes_by_loaded_table"] = all(
            torch.equal(e, t[tokens.t().reshape(-1)]) for e, t in zip(experts, tables)) and len(tables) == 2
        out["host_vs_device"] = (with_host - without).abs().max().item()
    if case["router"] == "expert-choice":
        router = model.moe_layers[0].router
        out["thresholds_initialized"] = bool(router.thresholds_initialized)
        model.eval()
        with torch.no_grad():
            out["eval_loss_finite"] = bool(model(tokens, positions(), None, labels=labels).isfinite().all())
    return out


@pytest.mark.parametrize("name", sorted(CHECKPOINT_CASES))
@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 1), (2, 2)], ids=["ep2", "tp2sp", "tp2xep2"])
def test_dist_checkpoint_saved_at_world_2_loads_at_world_1(name, tp, ep, tmp_path):
    case = CHECKPOINT_CASES[name]
    weights = run_distributed(_checkpoint_reference, world_size=1, args=(case,))[0]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    files = run_distributed(_save_checkpoint, world_size=2, tp=tp, ep=ep, args=(case, weights, str(ckpt)))[0]
    assert "metadata.json" in files and any(f.endswith(".distcp") for f in files)
    res = run_distributed(_load_checkpoint, world_size=1, args=(case, weights, str(ckpt)))[0]
    assert res["before"] > 1e-3  # the fresh model really differed
    assert res["after"] == 0.0 and sorted(res["compared"]) == sorted(weights), res["after"]
    assert any("experts" in k for k in res["compared"]) and any("router" in k for k in res["compared"])
    # the routers' buffers (hash table; Expert Choice thresholds and their flag) differ in a fresh
    # model and come back from the checkpoint
    assert len(res["buffers"]) == {"hash": 2, "expert-choice": 2}.get(case["router"], 0), res["buffers"]
    for key, (fresh_differs, restored) in res["buffers"].items():
        assert fresh_differs and restored, key
    if case["router"] == "hash":
        assert res["hash_routes_by_loaded_table"] and res["host_vs_device"] == 0.0, res
    if case["router"] == "expert-choice":
        assert res["thresholds_initialized"] and res["eval_loss_finite"], res

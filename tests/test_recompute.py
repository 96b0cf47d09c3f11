"""Activation recomputation (Megatron-LM's --recompute-* flags) with our MoE layers.

Each case trains one step of megatron's forward-backward schedule (2 micro-batches of gradient
accumulation, or pipeline parallel 2) from the same weights and seeds, once without and once with
recomputation, and asserts: the losses and every parameter's gradient equal (dropout 0.1 on, so
the RNG states must be replayed too), the routers' decisions in the recomputation equal the
original call's, the routing metrics and the token-shuffle call counter counted once per
micro-batch (not twice), and far fewer bytes saved for backward. Both layouts: paper (an MoE
block after transformer layer 2) and Megatron (every second layer's MLP is an MoE layer).

The pipeline case makes the token-id plumbing sharp: 1F1B runs forward of micro-batch 2 on stage
0 before the backward of micro-batch 1, so a recomputation reading the ids last handed to the
layer would route micro-batch 1 by micro-batch 2's ids; a control run that does just that (the
replay hook patched to hand the live ids) must give different gradients with the hash router.
"""
import pytest
import torch

from moe_cases import BATCH, EXPERTS, SEQ, VOCAB, batch, positions
from distributed import global_tensors, load_global_tensors, run_distributed

TOL = 1e-6
DROPOUT = 0.1
MICRO_BATCHES = 2

# name -> ModelConfig recompute fields
RECOMPUTE = {
    "full-uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=2),
    "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3),
    "selective": dict(recompute_activations=True),  # megatron's default modules: core_attn
    "selective-moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
    "selective-mlp": dict(recompute_granularity="selective", recompute_modules=["mlp"]),
}
# router -> (router name, StableMoE stage)
ROUTERS = {"stablemoe-stage1": ("stablemoe", 1), "stablemoe-stage2": ("stablemoe", 2),
           "switch": ("switch", 1), "base": ("base", 1), "hash": ("hash", 1), "expert-choice": ("expert-choice", 1)}
CASES = [(router, layout) for router in sorted(ROUTERS) for layout in ("paper", "megatron")
         if router != "expert-choice" or layout == "paper"]  # its router state: one layout is enough


# ----------------------------------------------------------------------------------------------
# helpers (run inside the workers)
# ----------------------------------------------------------------------------------------------
def build(router, layout, recompute=None, stage=1, num_layers=4):
    """A tiny GPT with MoE layers (4 experts, dropout 0.1) and the given recompute flags."""
    from megatron.core import parallel_state as ps

    from stablemoe_megatron.model.config import ModelConfig
    from stablemoe_megatron.model.gpt import build_model, transformer_config
    from stablemoe_megatron.moe.config import MoEConfig

    model_cfg = ModelConfig(num_layers=num_layers, hidden_size=32, num_attention_heads=4, seq_length=SEQ,
                            untie_embeddings_and_output_weights=True, hidden_dropout=DROPOUT,
                            attention_dropout=DROPOUT, add_bias_linear=False, **(recompute or {}))
    moe = MoEConfig(num_experts=EXPERTS, router=router, layer_positions="middle",
                    layer_freq=2 if layout == "megatron" else None, sublayers_per_expert=2)
    config = transformer_config(model_cfg, moe, pipeline_parallel=ps.get_pipeline_model_parallel_world_size())
    model = build_model(model_cfg, moe, VOCAB, config)
    if stage == 2:
        model.enter_stage_two()
    return model


def _reset_aux_scale():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.main_loss_backward_scale = None


class SavedBytes:
    """Bytes of activations autograd saves for backward during a forward (parameters excluded,
    each storage counted once): ``with SavedBytes(model) as saved: ...; saved.total``."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda packed: packed)

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def train_step(router, layout, recompute, weights, stage=1, live_ids_control=False):
    """One step of megatron's schedule (MICRO_BATCHES micro-batches) from ``weights``.

    Returns the last stage's losses, this rank's gradients (by global name without pipelining),
    the routing metrics (and Expert Choice thresholds), the metric and token-shuffle call counts,
    the experts each router call chose (original calls and recomputations apart) and the
    activation bytes one micro-batch's forward saves. ``live_ids_control``: the bug this guards
    against, a recomputation reading the ids handed last (:func:`_replay_live_ids`).
    """
    from megatron.core import parallel_state as ps

    from stablemoe_megatron.model import moe_host
    from stablemoe_megatron.moe.layer import recomputing
    from stablemoe_megatron.parallel import seed_everything

    _reset_aux_scale()
    seed_everything(7)  # the token shuffle's seed is the torch seed at build time
    model = build(router, layout, recompute, stage)
    assert load_global_tensors(model, weights) > 0
    model.train()
    model.start_moe_step(0)
    routed = {"original": {}, "recomputed": {}}
    for layer in model.moe_layers:
        layer.router.register_forward_hook(lambda module, args, out, n=layer.layer_number: routed[
            "recomputed" if args[0].replay else "original"].setdefault(n, []).append(out.expert_index.clone()))
    micro = BATCH // MICRO_BATCHES
    tokens, labels = batch(0)
    chunks = list(zip(tokens.split(micro), labels.split(micro)))
    original_replay = moe_host._replay
    if live_ids_control:
        moe_host._replay = _replay_live_ids
    seed_everything(7)
    try:
        losses = _schedule(model, chunks, micro)
    finally:
        moe_host._replay = original_replay
        _reset_aux_scale()
    assert not recomputing()
    out = dict(losses=losses if ps.is_pipeline_last_stage() else None, routed=_copy(routed),
               calls={layer.layer_number: layer.metrics.calls for layer in model.moe_layers},
               shuffles={layer.layer_number: layer.shuffle.calls for layer in model.moe_layers
                         if layer.shuffle is not None},
               metrics=_metrics_and_thresholds(model),
               grads=global_tensors(model, grads=True) if ps.get_pipeline_model_parallel_world_size() == 1
               else _stage_grads(model))
    out["saved"] = _saved_bytes(model, chunks[0], micro)
    return out


def _schedule(model, chunks, micro):
    """megatron's forward-backward schedule over ``chunks``; the last stage's micro-batch losses."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        tok, lab = next(data_iterator)
        losses = model(tok, positions(micro), None, labels=lab, host_token_ids=tok)
        return losses, lambda out: (out.mean(), {"loss": out.mean().detach()})

    stats = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(chunks), model=[model],
        num_microbatches=len(chunks), seq_length=SEQ, micro_batch_size=micro, forward_only=False)
    return [entry["loss"] for entry in stats]


def _replay_live_ids(contexts, grad):
    """Control stand-in for ``moe_host._replay``: hand each layer the ids of the LAST forward."""
    for layers, _ in contexts:
        for layer in layers:
            layer.replay_context = layer._context


def _copy(routed):
    return {kind: {n: list(calls) for n, calls in layers.items()} for kind, layers in routed.items()}


def _metrics_and_thresholds(model):
    """The routing metrics of the step, and for Expert Choice the thresholds the step folds in
    (one k-th largest probability per micro-batch: a recomputation must not add one)."""
    metrics = {n: {k: v.clone() for k, v in m.items()} for n, m in model.moe_metrics(reset=False).items()}
    expert_choice = [layer for layer in model.moe_layers if hasattr(layer.router, "thresholds")]
    counts = {layer.layer_number: layer.router._kth_count for layer in expert_choice}
    assert counts == {n: MICRO_BATCHES for n in counts}, counts
    model.finalize_moe_step()
    for layer in expert_choice:
        metrics[f"thresholds-{layer.layer_number}"] = {"thresholds": layer.router.thresholds.clone()}
    return metrics


def _stage_grads(model):
    """Gradients of this pipeline stage's parameters, by name (both runs build the same stage)."""
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model, chunk, micro):
    """Activation bytes one training forward (first pipeline stage or whole model) saves for backward."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        return None
    tok, lab = chunk
    with SavedBytes(model) as saved:
        losses = model(tok, positions(micro), None, labels=lab, host_token_ids=tok)
    losses.mean().backward()  # frees the graph (and runs the recomputation outside the count)
    model.zero_grad()
    return saved.total


def _weights(router, layout, stage):
    return global_tensors(build(router, layout, None, stage))


def compare_recompute(router, layout, stage, names):
    """The step without recomputation and with each of ``names``; max differences and the rest."""
    weights = _weights(router, layout, stage)
    ref = train_step(router, layout, None, weights, stage)
    out = {"ref": ref}
    for name in names:
        run = train_step(router, layout, RECOMPUTE[name], weights, stage)
        run["loss_diff"] = max(abs(a.item() - b.item()) for a, b in zip(run["losses"], ref["losses"]))
        assert set(run["grads"]) == set(ref["grads"]), name
        run["grad_diff"] = max((run["grads"][k] - ref["grads"][k]).abs().max().item() for k in ref["grads"])
        del run["grads"]
        out[name] = run
    return out


def _assert_same_routing_and_metrics(run, ref, name):
    assert run["calls"] == ref["calls"] == {n: MICRO_BATCHES for n in ref["calls"]}, name
    assert run["shuffles"] == ref["shuffles"], name  # the counter advanced once per micro-batch
    for n, metrics in ref["metrics"].items():
        assert set(run["metrics"][n]) == set(metrics), name
        for key, value in metrics.items():
            assert torch.equal(run["metrics"][n][key], value), (name, n, key)
    for n, calls in ref["routed"]["original"].items():
        assert len(calls) == MICRO_BATCHES and ref["routed"]["recomputed"] == {}
        original, again = run["routed"]["original"][n], run["routed"]["recomputed"].get(n, [])
        assert all(torch.equal(a, b) for a, b in zip(original, calls)), (name, n)
        assert all(torch.equal(a, b) for a, b in zip(again, calls)), (name, n)  # same decision when re-run


# ----------------------------------------------------------------------------------------------
# 1. gradient accumulation (2 micro-batches), every router, both layouts, every recompute setting
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("router_case,layout", CASES)
def test_recomputation_gives_the_same_step(router_case, layout):
    router, stage = ROUTERS[router_case]
    names = [n for n in RECOMPUTE if layout == "megatron" or n != "selective-mlp"]
    results = run_distributed(compare_recompute, world_size=1, args=(router, layout, stage, names))[0]
    ref = results.pop("ref")
    recomputed_calls = {}
    for name, run in results.items():
        assert run["loss_diff"] <= TOL and run["grad_diff"] <= TOL, (name, run["loss_diff"], run["grad_diff"])
        _assert_same_routing_and_metrics(run, ref, name)
        recomputed_calls[name] = sum(len(c) for c in run["routed"]["recomputed"].values())
    moe_layers = len(ref["calls"])
    block = RECOMPUTE["full-block"]["recompute_num_layers"]
    # full recomputation re-runs every MoE layer call once in backward (block: those in the first
    # layers), "moe" too; "selective" (core_attn) none; "mlp" the Megatron-layout MoE layers
    # (megatron runs them as MLPs)
    assert recomputed_calls["full-uniform"] == recomputed_calls["selective-moe"] == moe_layers * MICRO_BATCHES
    assert recomputed_calls["full-block"] == sum(n <= block for n in ref["calls"]) * MICRO_BATCHES > 0
    assert recomputed_calls["selective"] == 0
    if layout == "megatron":
        assert recomputed_calls["selective-mlp"] == moe_layers * MICRO_BATCHES
    # activation memory: what one micro-batch's forward keeps for backward (parameters excluded)
    share = {name: run["saved"] / ref["saved"] for name, run in results.items()}
    assert share["full-uniform"] < 0.2 and share["full-block"] < 0.5, share
    assert all(value < 0.9 for value in share.values()), share


# ----------------------------------------------------------------------------------------------
# 2. pipeline parallel 2: 1F1B runs forward 2 before backward 1 on stage 0 (the MoE layer's)
# ----------------------------------------------------------------------------------------------
PIPELINE_RECOMPUTE = {
    "full-uniform": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
    "full-block": dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=2),
    "selective-moe": dict(recompute_granularity="selective", recompute_modules=["moe"]),
}


def compare_pipeline(layout):
    """Per router (hash, StableMoE stage 2: both route by token id): the step without and with
    each recompute setting on this rank's stage, and the live-ids control."""
    out = {}
    for router, stage in (("hash", 1), ("stablemoe", 2)):
        weights = _weights(router, layout, stage)
        ref = train_step(router, layout, None, weights, stage)
        settings = dict(PIPELINE_RECOMPUTE, **({"selective-mlp": RECOMPUTE["selective-mlp"]}
                                               if layout == "megatron" else {}))
        runs = {name: train_step(router, layout, recompute, weights, stage) for name, recompute in settings.items()}
        runs["control"] = train_step(router, layout, PIPELINE_RECOMPUTE["full-uniform"], weights, stage,
                                     live_ids_control=True)
        for run in runs.values():
            run["grad_diff"] = max((run["grads"][k] - ref["grads"][k]).abs().max().item() for k in ref["grads"])
            del run["grads"]
        del ref["grads"]
        out[router] = dict(ref=ref, runs=runs)
    return out


@pytest.mark.parametrize("layout", ["paper", "megatron"])
def test_recomputation_under_pipeline_parallelism_uses_each_micro_batchs_ids(layout):
    first, last = run_distributed(compare_pipeline, world_size=2, pp=2, args=(layout,))
    for router in first:
        for rank in (first, last):
            ref, runs = rank[router]["ref"], rank[router]["runs"]
            control = runs.pop("control")
            for name, run in runs.items():
                assert run["grad_diff"] <= TOL, (router, name, run["grad_diff"])
                if run["losses"] is not None:
                    assert max(abs(a.item() - b.item()) for a, b in zip(run["losses"], ref["losses"])) <= TOL
                _assert_same_routing_and_metrics(run, ref, name)
                recomputed = sum(len(c) for c in run["routed"]["recomputed"].values())
                assert recomputed == len(ref["calls"]) * MICRO_BATCHES, (router, name)
            if rank is first:
                assert ref["calls"], "an MoE layer on stage 0, whose backward 1 follows forward 2"
                # reading the ids last handed (micro-batch 2's) in the recomputation of micro-batch 1
                assert control["grad_diff"] > 1e-3, (router, control["grad_diff"])


# ----------------------------------------------------------------------------------------------
# 3. the flags: Megatron-LM's names and rules, mapped onto megatron's TransformerConfig
# ----------------------------------------------------------------------------------------------
def _model(**recompute):
    from stablemoe_megatron.model.config import ModelConfig

    return ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=SEQ, **recompute)


def test_flags_parse_and_map_onto_megatrons_transformer_config():
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.model.gpt import transformer_config
    from stablemoe_megatron.moe.config import MoEConfig

    config = parse_config(["--recompute-granularity", "full", "--recompute-method", "block",
                           "--recompute-num-layers", "2"])
    assert (config.model.recompute_granularity, config.model.recompute_method,
            config.model.recompute_num_layers) == ("full", "block", 2)
    moe = MoEConfig(num_experts=EXPERTS, router="hash", layer_positions="middle")
    full = transformer_config(_model(recompute_granularity="full", recompute_method="block",
                                     recompute_num_layers=2), moe, pipeline_parallel=2)
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "block", 2)
    # --recompute-activations is selective with megatron's default modules (core attention)
    assert parse_config(["--recompute-activations"]).model.recompute_activations
    selective = transformer_config(_model(recompute_activations=True), moe)
    assert (selective.recompute_granularity, selective.recompute_modules) == ("selective", ["core_attn"])
    moe_modules = transformer_config(_model(recompute_granularity="selective",
                                            recompute_modules=["core_attn", "moe"]), moe)
    assert moe_modules.recompute_modules == ["core_attn", "moe"]
    off = transformer_config(_model(), moe)
    assert off.recompute_granularity is None


@pytest.mark.parametrize("recompute,pp,message", [
    (dict(recompute_granularity="full", recompute_num_layers=1), 1,
     "--recompute-granularity full needs --recompute-method uniform or block"),
    (dict(recompute_granularity="full", recompute_method="uniform"), 1,
     "--recompute-granularity full needs --recompute-num-layers between 1 and 4, the layers of a pipeline "
     "stage (--num-layers 4 / --pipeline-model-parallel-size 1)"),
    (dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=3), 2,
     "--recompute-granularity full needs --recompute-num-layers between 1 and 2, the layers of a pipeline "
     "stage (--num-layers 4 / --pipeline-model-parallel-size 2), got 3"),
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3), 1,
     "--recompute-method uniform recomputes chunks of --recompute-num-layers 3 layers, which must divide "
     "the 4 layers of a pipeline stage: use a divisor of 4, or --recompute-method block"),
    (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1,
          recompute_modules=["moe"]), 1,
     "--recompute-modules chooses what selective recomputation re-runs; --recompute-granularity full "
     "re-runs whole layers: drop --recompute-modules"),
    (dict(recompute_activations=True, recompute_method="uniform"), 1,
     "--recompute-method is not supported with selective recomputation (--recompute-granularity selective, "
     "or --recompute-activations), which recomputes the --recompute-modules of every layer: drop "
     "--recompute-method"),
    (dict(recompute_granularity="selective", recompute_num_layers=2), 1,
     "--recompute-num-layers is not supported with selective recomputation (--recompute-granularity "
     "selective, or --recompute-activations), which recomputes the --recompute-modules of every layer: "
     "drop --recompute-num-layers"),
    (dict(recompute_activations=True, recompute_granularity="full", recompute_method="uniform",
          recompute_num_layers=1), 1,
     "--recompute-activations means --recompute-granularity selective; it contradicts "
     "--recompute-granularity full: drop one of them"),
    (dict(recompute_method="uniform", recompute_num_layers=1), 1,
     "--recompute-method and --recompute-num-layers do nothing without activation recomputation: add "
     "--recompute-granularity full (method, layers) or selective (modules)"),
    (dict(recompute_granularity="selective", recompute_modules=["moe_act"]), 1,
     "--recompute-modules moe_act recomputes the activation of megatron's grouped-GEMM experts "
     "(--moe-grouped-gemm), which this model does not use: recompute whole MoE layers with "
     "--recompute-modules moe"),
    (dict(recompute_granularity="selective", recompute_modules=["attention"]), 1,
     "--recompute-modules attention: unknown; choose from core_attn, layernorm, mlp, moe"),
    (dict(recompute_granularity="sometimes"), 1,
     "--recompute-granularity must be full or selective, got 'sometimes'"),
])
def test_bad_combinations_are_config_errors(recompute, pp, message):
    from stablemoe_megatron.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        _model(**recompute).recompute_kwargs(pp)
    assert str(err.value) == message


def test_layernorm_recomputation_needs_transformer_engine():
    """megatron-core 0.16's CheckpointWithoutOutput reads transformer-engine's FP8 state."""
    from stablemoe_megatron.errors import ConfigError

    model = _model(recompute_granularity="selective", recompute_modules=["layernorm"])
    assert model.recompute_kwargs(1, transformer_engine=True)["recompute_modules"] == ["layernorm"]
    assert model.recompute_kwargs(1)["recompute_modules"] == ["layernorm"]  # preflight: not known yet
    with pytest.raises(ConfigError, match="^--recompute-modules layernorm needs transformer-engine"):
        model.recompute_kwargs(1, transformer_engine=False)


def test_preflight_checks_the_flags_against_the_pipeline_layout(tmp_path):
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.errors import ConfigError
    from stablemoe_megatron.training.preflight import preflight

    config = parse_config(["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
                           "--seq-length", "16", "--micro-batch-size", "1", "--train-iters", "10",
                           "--pipeline-model-parallel-size", "2",
                           "--recompute-granularity", "full", "--recompute-method", "uniform",
                           "--recompute-num-layers", "4", "--data-path", str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="needs --recompute-num-layers between 1 and 2"):
        preflight(config, world_size=2)

"""Megatron-LM checkpoints as a run's starting point, upcycling into MoE, and Megatron-LM's fields in ours.

The Megatron-LM checkpoint is made here with megatron-core itself, as Megatron-LM's pretrain_gpt.py
(``--transformer-impl local --ckpt-format torch_dist``, its defaults otherwise: linear biases,
GeLU, LayerNorm, learned positions) writes it: megatron's GPTModel with the local layer spec,
``dist_checkpointing.save`` of the model's sharded state dict with ``iteration``,
``checkpoint_version`` 3.0, ``args`` (an argparse Namespace), an LR scheduler state, RNG state and
an optimizer tensor, plus the tracker file. Our trainer starts from it; what is asserted:

* dense: every weight equals the checkpoint's, the logits equal the Megatron model's (bitwise),
  iteration and consumed samples are 0; a restart resumes from --load (not the pretrained one);
* upcycled, Megatron layout: every expert's fc1/fc2 (weights and biases) equal the dense MLP of its
  layer, and each MoE layer's output is ``g_t * MLP(x_t)`` for every token (gate-free hash router:
  the whole model's logits equal the dense model's);
* upcycled, paper layout (StableMoE): every expert sublayer's fc1 and norm equal the MLP and pre-MLP
  norm of the layer the block follows; fc2 zero (``--moe-expert-output-init zero``) makes the
  logits equal the dense model's bitwise, fc2 copied (``normal``) makes the experts whole copies;
* a model flag that differs from the checkpoint's args stops with one message naming it;
* our checkpoints' common.pt carries iteration / checkpoint_version / args (torch.load).
"""
import random
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from data_fixtures import tiny_dataset
from distributed import run_distributed
from trainer_cases import tiny_flags

ITERATION, LAYERS, HIDDEN, FFN, HEADS, SEQ, VOCAB = 7, 2, 32, 128, 4, 32, 512  # VOCAB: 500 padded to 128
DENSE = {"--num-experts": False, "--moe-router": False, "--moe-sublayers-per-expert": False,
         "--moe-stage2-start-iter": False, "--disable-bias-linear": False}  # Megatron-LM's default: biases


def _megatron_args(swiglu: bool) -> Namespace:
    """A (shortened) Megatron-LM args Namespace of the dense model, as pretrain_gpt.py saves it."""
    return Namespace(num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=_ffn(swiglu), num_attention_heads=HEADS,
                     seq_length=SEQ, max_position_embeddings=SEQ, padded_vocab_size=VOCAB,
                     make_vocab_size_divisible_by=128, position_embedding_type="learned_absolute",
                     normalization="LayerNorm", swiglu=swiglu, add_bias_linear=True, group_query_attention=False,
                     untie_embeddings_and_output_weights=False, tensor_model_parallel_size=1,
                     pipeline_model_parallel_size=1, params_dtype=torch.float32, ckpt_format="torch_dist",
                     tokenizer_type="SentencePieceTokenizer", consumed_train_samples=56, iteration=ITERATION)


def _ffn(swiglu: bool) -> int:
    return FFN // 2 if swiglu else FFN  # SwiGLU: fc1 is [2 * ffn, h]


def _tokens():
    return torch.randint(0, 500, (2, SEQ), generator=torch.Generator().manual_seed(3))


def _params(model) -> dict:
    """{parameter name: a copy}: megatron's GPTModel and ours name every dense part the same."""
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def _logits(model, tokens):
    """The model's logits [B, S, V] in evaluation mode (no dropout, no token shuffle)."""
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    model.eval()
    with torch.no_grad():
        out = model(tokens, positions, None)
    model.train()
    return out


def _write_megatron_lm_checkpoint(root, swiglu=False):
    """In a worker: a dense GPTModel (megatron's local spec) saved as Megatron-LM does; returns
    (its parameters, its logits for :func:`_tokens`)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    glu = dict(gated_linear_unit=True, activation_func=torch.nn.functional.silu) if swiglu else {}
    config = TransformerConfig(
        num_layers=LAYERS, hidden_size=HIDDEN, ffn_hidden_size=_ffn(swiglu), num_attention_heads=HEADS, **glu,
        hidden_dropout=0.0, attention_dropout=0.0, add_bias_linear=True, use_cpu_initialization=True,
        gradient_accumulation_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, persist_layer_norm=False, pipeline_dtype=torch.float32)
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                     share_embeddings_and_output_weights=True)  # pretrain_gpt.py without --untie-...
    with torch.no_grad():  # biases are zero at init: make them count
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.02)
    sharded = model.sharded_state_dict()
    embedding = sharded["embedding.word_embeddings.weight"]
    state = {"model": sharded, "iteration": ITERATION, "checkpoint_version": 3.0, "args": _megatron_args(swiglu),
             "num_floating_point_operations_so_far": 0, "opt_param_scheduler": {"num_steps": 56},
             "rng_state": ShardedObject("rng_state", [{"torch_rng_state": torch.get_rng_state()}], (1, 1), (0, 0)),
             "optimizer": {"state": ShardedTensor.from_rank_offsets(
                 "optimizer.state.exp_avg.embedding.word_embeddings.weight", torch.zeros_like(embedding.data))}}
    directory = Path(root) / f"iter_{ITERATION:07d}"
    directory.mkdir(parents=True)
    dist_checkpointing.save(state, str(directory))
    (Path(root) / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
    return _params(model), _logits(model, _tokens())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("megatron_lm_data"))


def _megatron_lm(tmp_path_factory, swiglu):
    root = tmp_path_factory.mktemp("megatron_lm") / "ckpt"
    weights, logits = run_distributed(_write_megatron_lm_checkpoint, 1, args=(str(root), swiglu))[0]
    return root, weights, logits


@pytest.fixture(scope="module")
def megatron_lm(tmp_path_factory):
    """(checkpoint root, {parameter name: tensor} of its model, its logits)."""
    return _megatron_lm(tmp_path_factory, False)


@pytest.fixture(scope="module")
def megatron_lm_swiglu(tmp_path_factory):
    return _megatron_lm(tmp_path_factory, True)


# -- worker jobs -----------------------------------------------------------------------------------------
def _rng():
    from stablemoe_megatron.training.checkpointing import _rng_state

    state = _rng_state()
    return {"torch": state["torch"], "python": state["python"]}


def _built(argv):
    """(trainer) built for training from ``argv`` (the caller releases it)."""
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.training.build import build

    return build(parse_config(argv), "train")


def _inspect(argv, gates=False):
    """Build from ``argv``; the start state, weights, logits, and (``gates``) each MoE layer's
    input, output and routing decision for :func:`_tokens`."""
    trainer = _built(argv)
    try:
        seen = {}
        for layer in trainer.model.moe_layers:
            layer.keep_last_decision = True
            layer.register_forward_hook(lambda mod, args, out: seen.__setitem__(
                mod.layer_number, (args[0].detach().clone(), out[0].detach().clone())))
        logits = _logits(trainer.model, _tokens())
        decisions = {layer.layer_number: (layer.last_decision.token_index, layer.last_decision.gates)
                     for layer in trainer.model.moe_layers}
        return {"iteration": trainer.state.iteration, "consumed": trainer.state.consumed_train_samples,
                "weights": _params(trainer.model), "logits": logits,
                "moe": {n: (*seen[n], *decisions[n]) for n in seen} if gates else None}
    finally:
        trainer.release()


def _start_train_restart(argv, argv_no_rng):
    """Start from the pretrained weights and train to the end (saving); restart; restart with --no-load-rng."""
    from stablemoe_megatron.training.loop import train_loop
    from stablemoe_megatron.training.reporting import Reporter

    trainer = _built(argv)
    try:
        start = {"iteration": trainer.state.iteration, "consumed": trainer.state.consumed_train_samples,
                 "weights": _params(trainer.model), "logits": _logits(trainer.model, _tokens()),
                 "rng": _rng()}
        torch.manual_seed(99)  # the RNG saved with the checkpoint is not the one a fresh build has
        random.seed(99)
        train_loop(trainer, Reporter(None, None, trainer.config.training.train_iters))
        saved_rng, end = _rng(), trainer.state.iteration
    finally:
        trainer.release()
    restarts = []
    for flags in (argv, argv_no_rng):
        trainer = _built(flags)
        restarts.append({"iteration": trainer.state.iteration, "rng": _rng()})
        trainer.release()
    return start, saved_rng, end, restarts


def _equal_rng(a, b) -> bool:
    return torch.equal(a["torch"], b["torch"]) and a["python"] == b["python"]


# -- dense: --pretrained-checkpoint, --finetune ---------------------------------------------------------
def test_pretrained_checkpoint_starts_at_iteration_0_and_restarts_from_load(data, megatron_lm, tmp_path):
    root, weights, logits = megatron_lm
    save = tmp_path / "run"  # does not exist yet: --load has no checkpoint, so the pretrained one is used
    argv = tiny_flags(data, **DENSE, **{"--pretrained-checkpoint": root, "--load": save, "--save": save,
                                        "--train-iters": 2})
    start, saved_rng, end, (restart, no_rng) = run_distributed(
        _start_train_restart, 1, args=(argv, argv + ["--no-load-rng"]))[0]
    assert start["iteration"] == 0 and start["consumed"] == 0
    assert sorted(start["weights"]) == sorted(weights)
    for key, value in weights.items():
        assert torch.equal(start["weights"][key], value), key
    assert torch.equal(start["logits"], logits)
    assert end == 2
    assert restart["iteration"] == 2 and no_rng["iteration"] == 2  # a restart resumes from --load
    assert _equal_rng(restart["rng"], saved_rng) and not _equal_rng(restart["rng"], start["rng"])
    assert _equal_rng(no_rng["rng"], start["rng"])  # --no-load-rng: as seeded by this run

    # Megatron-LM's fields in our checkpoint's common.pt (and megatron's own common entries kept)
    import megatron.core  # noqa: F401 - registers megatron's safe globals (Namespace) for torch.load
    from megatron.core import dist_checkpointing

    from stablemoe_megatron.checkpoint.megatron_lm import model_differences
    from stablemoe_megatron.cli_args import parse_config

    common = torch.load(save / "iter_0000002" / "common.pt")
    assert common["iteration"] == 2 and common["checkpoint_version"] == 3.0
    args = common["args"]
    assert isinstance(args, Namespace)
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads) == (LAYERS, HIDDEN,
                                                                                                    FFN, HEADS)
    assert (args.padded_vocab_size, args.add_bias_linear, args.swiglu, args.iteration) == (VOCAB, True, False, 2)
    assert args.consumed_train_samples == 2 * 8 and args.num_experts is None
    assert model_differences(parse_config(argv), args) == []
    assert "opt_param_scheduler" in common and "optimizer" in common
    assert dist_checkpointing.load_common_state_dict(str(save / "iter_0000002"))["iteration"] == 2


def test_finetune_loads_the_weights_of_load_only(data, megatron_lm, tmp_path):
    root, weights, _ = megatron_lm
    argv = tiny_flags(data, **DENSE, **{"--load": root, "--finetune": True, "--save": tmp_path / "ft"})
    result = run_distributed(_inspect, 1, args=(argv,))[0]
    assert result["iteration"] == 0 and result["consumed"] == 0
    for key, value in weights.items():
        assert torch.equal(result["weights"][key], value), key


def _preflight(argv):
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.training.preflight import preflight

    return preflight(parse_config(argv), 1)


@pytest.mark.parametrize("extra, expected", [
    ({"--hidden-size": 64, "--ffn-hidden-size": FFN}, "--hidden-size 64 (checkpoint: 32)"),
    ({"--disable-bias-linear": True}, "--add-bias-linear False (checkpoint: True)"),
], ids=["hidden-size", "bias"])
def test_a_model_flag_that_differs_from_the_checkpoint_is_named(data, megatron_lm, tmp_path, extra, expected):
    from stablemoe_megatron.errors import ConfigError

    root = megatron_lm[0]
    argv = tiny_flags(data, **{**DENSE, **extra}, **{"--pretrained-checkpoint": root, "--save": tmp_path / "x"})
    with pytest.raises(ConfigError) as info:
        _preflight(argv)
    assert str(info.value) == (f"--pretrained-checkpoint {root} holds a different model: {expected}. "
                               f"Use the checkpoint's settings (its common.pt args).")


def test_flag_combinations_that_cannot_work_are_refused(data, megatron_lm, tmp_path):
    from stablemoe_megatron.errors import ConfigError

    root = megatron_lm[0]
    with pytest.raises(ConfigError, match=r"holds a Megatron-LM checkpoint \(no train_state.json\).*--finetune"):
        _preflight(tiny_flags(data, **DENSE, **{"--load": root, "--save": tmp_path / "a"}))
    with pytest.raises(ConfigError, match="--finetune restarts at iteration 0, but --save .* is the --load directory"):
        _preflight(tiny_flags(data, **DENSE, **{"--load": root, "--save": root, "--finetune": True}))
    with pytest.raises(ConfigError, match="--moe-use-upcycling grows the experts from a dense checkpoint"):
        _preflight(tiny_flags(data, **{"--moe-use-upcycling": True, "--save": tmp_path / "b"}))
    checked = _preflight(tiny_flags(data, **DENSE, **{"--pretrained-checkpoint": root}))
    assert checked.load_dir is None and checked.weights.iteration == ITERATION and not checked.weights.ours


def test_megatron_lm_features_not_built_here_are_named():
    from stablemoe_megatron.checkpoint.megatron_lm import megatron_args, model_differences
    from stablemoe_megatron.cli_args import parse_config

    config = parse_config(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                           "--seq-length", "32"])
    args = megatron_args(config, VOCAB, 0)
    assert model_differences(config, args) == []
    assert model_differences(config, Namespace(num_layers=2)) == []  # absent: Megatron-LM's defaults, ours too
    args.normalization, args.group_query_attention, args.num_experts = "RMSNorm", True, 8
    assert model_differences(config, args) == [
        "--normalization LayerNorm (checkpoint: RMSNorm)",
        "--group-query-attention True in the checkpoint: grouped-query attention, which this trainer does not build",
        "--num-experts 8 in the checkpoint: a Megatron-LM MoE model, whose experts are not read here: start from "
        "a dense checkpoint (with --moe-use-upcycling to grow experts from its MLPs)"]


# -- upcycling --------------------------------------------------------------------------------------------
def _mlp(weights: dict, layer: int, x: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
    """The dense checkpoint's MLP of ``layer`` (0-based) on x [T, h] (megatron's: GeLU or SwiGLU, biases)."""
    w = lambda name: weights[f"decoder.layers.{layer}.mlp.{name}"]  # noqa: E731
    fc1 = x @ w("linear_fc1.weight").t() + w("linear_fc1.bias")
    if swiglu:
        gate, value = torch.chunk(fc1, 2, dim=-1)
        hidden = torch.nn.functional.silu(gate) * value
    else:
        hidden = torch.nn.functional.gelu(fc1)
    return hidden @ w("linear_fc2.weight").t() + w("linear_fc2.bias")


MEGATRON_LAYOUTS = {  # name: (router, SwiGLU, --moe-layer-freq: Megatron-LM's meaning, layer i is MoE when i % k == 0)
    "hash-every-layer": ("hash", False, 1),
    "stablemoe-every-layer": ("stablemoe", False, 1),
    "hash-swiglu-first-layer": ("hash", True, 2),  # layer 2 stays dense: its SwiGLU MLP is loaded alone
}


@pytest.mark.parametrize("case", sorted(MEGATRON_LAYOUTS))
def test_upcycled_megatron_layout_experts_copy_the_mlp_they_replace(data, request, case):
    """The MLPs of the MoE layers become 4 copies of themselves; each MoE layer computes g_t * MLP(x_t)."""
    router, swiglu, freq = MEGATRON_LAYOUTS[case]
    root, weights, logits = request.getfixturevalue("megatron_lm_swiglu" if swiglu else "megatron_lm")
    dense = weights
    glu = {"--swiglu": True, "--ffn-hidden-size": _ffn(True)} if swiglu else {}
    argv = tiny_flags(data, **{**DENSE, **glu, "--num-experts": 4, "--moe-router": router, "--moe-layer-freq": freq,
                               "--moe-use-upcycling": True, "--pretrained-checkpoint": root})
    result = run_distributed(_inspect, 1, args=(argv, True))[0]
    ours = result["weights"]
    assert result["iteration"] == 0
    moe_layers = [layer for layer in range(LAYERS) if layer % freq == 0]
    assert sorted(result["moe"]) == [layer + 1 for layer in moe_layers]
    for layer in moe_layers:
        for name in ("linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight", "linear_fc2.bias"):
            for expert in range(4):
                mine = ours[f"decoder.layers.{layer}.mlp.experts.sublayers.0.local_experts.{expert}.{name}"]
                assert torch.equal(mine, dense[f"decoder.layers.{layer}.mlp.{name}"]), (layer, expert, name)
    for key, value in ours.items():  # every dense part of the model is the checkpoint's
        if ".mlp.experts." not in key and ".mlp.router." not in key:
            assert torch.equal(value, dense[key]), key
    for number, (x, out, token_index, gates) in result["moe"].items():
        x = x.reshape(-1, HIDDEN)
        expected = torch.zeros_like(x)
        expected.index_add_(0, token_index, gates.unsqueeze(1) * _mlp(dense, number - 1, x[token_index], swiglu))
        torch.testing.assert_close(out.reshape(-1, HIDDEN), expected, rtol=1e-5, atol=1e-6)
        if router == "hash":
            assert torch.equal(gates, torch.ones_like(gates))
    if router == "hash":  # gate 1: the upcycled model is the dense model
        assert torch.equal(result["logits"], logits)


@pytest.mark.parametrize("output_init", ["zero", "normal"])
def test_upcycled_paper_layout_experts_start_from_the_mlp_of_their_layer(data, megatron_lm, output_init):
    """StableMoE's MoE block after layer 1 (of 2), K = 2 sublayers: each sublayer's fc1 and norm
    copy layer 1's MLP and pre-MLP norm; fc2 zero keeps the dense model's function exactly."""
    root, weights, logits = megatron_lm
    dense = weights
    argv = tiny_flags(data, **{**DENSE, "--num-experts": 4, "--moe-router": "stablemoe",
                               "--moe-sublayers-per-expert": 2, "--moe-use-upcycling": True,
                               "--moe-expert-output-init": output_init, "--pretrained-checkpoint": root})
    result = run_distributed(_inspect, 1, args=(argv,))[0]
    ours, source = result["weights"], "decoder.layers.0.mlp."
    assert result["iteration"] == 0
    for k in range(2):
        for expert in range(4):
            prefix = f"decoder.layers.0.moe_block.experts.sublayers.{k}.local_experts.{expert}."
            for name in ("linear_fc1.weight", "linear_fc1.bias", "linear_fc2.weight", "linear_fc2.bias"):
                want = dense[source + name] if output_init == "normal" or "fc1" in name else 0 * dense[source + name]
                assert torch.equal(ours[prefix + name], want), (k, expert, name)
            for name in ("weight", "bias"):
                norm = ours[f"decoder.layers.0.moe_block.experts.norms.{k}.local_experts.{expert}.norm.{name}"]
                assert torch.equal(norm, dense[f"decoder.layers.0.pre_mlp_layernorm.{name}"])
    if output_init == "zero":
        assert torch.equal(result["logits"], logits)  # the block adds g * (z_K - h) = 0 exactly
    else:
        assert not torch.allclose(result["logits"], logits)  # whole copies: the block changes the function

"""Megatron-LM command lines: the flags with Megatron-LM's meanings and defaults, the ones not built
stop with one line, a saved pre-change config reads as the model it described, and a tiny run with
--swiglu, biases, top-level MoE in every layer, --train-samples and --exit-duration-in-mins trains."""
import math
from pathlib import Path

import pytest

from data_fixtures import tiny_dataset
from distributed import run_distributed
from stablemoe_megatron.cli_args import build_parser, config_from_yaml_text, dump_config, parse_config
from stablemoe_megatron.errors import ConfigError
from trainer_cases import losses_by_iteration, tiny_flags, train

SIZES = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("megatron_flags_data"))


def _validated(argv, world=1):
    config = parse_config([*SIZES, "--data-path", "x", "--train-iters", "10", *argv])
    config.validate(world)
    return config


def _message(argv, world=1) -> str:
    with pytest.raises(ConfigError) as err:
        _validated(argv, world)
    return str(err.value)


def test_defaults_are_megatron_lms_where_the_issue_named_them():
    config = parse_config([])
    assert (config.optimizer.clip_grad, config.optimizer.adam_beta2) == (1.0, 0.999)
    assert (config.model.hidden_dropout, config.model.attention_dropout) == (0.1, 0.1)
    assert (config.training.eval_iters, config.logging.log_interval) == (100, 100)
    assert config.model.add_bias_linear and not config.model.swiglu
    assert config.model.num_layers is None and config.training.train_iters is None


def test_size_flags_and_the_length_are_required():
    with pytest.raises(ConfigError, match=r"^--num-layers is required \(as in Megatron-LM\)"):
        parse_config(["--data-path", "x", "--train-iters", "1"]).validate(1)
    config = parse_config([*SIZES, "--data-path", "x"])
    with pytest.raises(ConfigError) as err:
        config.validate(1)
    assert str(err.value) == "--train-iters or --train-samples is required"


def test_swiglu_and_bias_reach_megatrons_transformer_config():
    from stablemoe_megatron.model.gpt import transformer_config_for

    config = _validated(["--swiglu", "--disable-bias-linear"])
    assert config.model.ffn_size == int(4 * 64 * 2 / 3 / 64) * 64 == 128
    tconfig = transformer_config_for(config)
    assert tconfig.gated_linear_unit and tconfig.activation_func.__name__ == "silu"
    assert not tconfig.add_bias_linear and tconfig.ffn_hidden_size == 128
    assert transformer_config_for(_validated([])).add_bias_linear
    assert _message(["--swiglu", "--activation", "relu"]) == \
        "--swiglu sets the FFN activation (SiLU-gated); drop --activation relu"


@pytest.mark.parametrize("freq,layers", [("1", [1, 2, 3, 4]), ("2", [1, 3]), ("3", [1, 4]),
                                          ("([0]+[1]*3)", [2, 3, 4]), ("[1,0,0,1]", [1, 4])])
def test_moe_layer_freq_has_megatrons_meaning(freq, layers):
    config = _validated(["--num-experts", "4", "--moe-layer-freq", freq])
    assert sorted(config.moe.moe_placement(4)) == layers
    assert set(config.moe.moe_placement(4).values()) == {"mlp"}
    # the resolved layout is printed at start-up and heads the saved config
    summary = config.moe.layout_summary(4)
    assert f"the MLP of layer(s) {','.join(map(str, layers))} of 4" in summary
    assert dump_config(config).splitlines()[0] == f"# {summary}"


@pytest.mark.parametrize("freq,message", [
    ("([0]+[1]*2)", "--moe-layer-freq pattern has 3 entries for --num-layers 4: give one 0/1 per layer"),
    ("[0,0,0,0]", "--moe-layer-freq pattern has no MoE layer (no 1): drop --num-experts for a dense model"),
    ("[2,0,0,1]", "--moe-layer-freq '[2,0,0,1]' must give a list of 0 (dense) and 1 (MoE), got [2, 0, 0, 1]"),
    ("__import__('os')", "--moe-layer-freq \"__import__('os')\": an integer k, or a list pattern such as \"([0]+[1]*3)\""),
    ("[os.system]", "--moe-layer-freq '[os.system]': a list pattern may hold only [ ] ( ) digits + * and commas (no **)"),
])
def test_bad_moe_layer_freq(freq, message):
    assert _message(["--num-experts", "4", "--moe-layer-freq", freq]) == message


def test_aux_loss_coeff_takes_megatrons_list_form_with_one_value():
    assert _validated(["--moe-aux-loss-coeff", "0.02"]).moe.aux_loss_coeff == 0.02
    with pytest.raises(ConfigError) as err:
        parse_config(["--moe-aux-loss-coeff", "0.01", "0.001"])
    assert str(err.value) == ("--moe-aux-loss-coeff takes one value here (one load-balancing loss per router), "
                              "got 2: 0.01 0.001")
    none = _validated(["--num-experts", "4", "--moe-router", "switch", "--moe-router-load-balancing-type", "none"])
    assert none.moe.aux_loss_coeff == 0.0


@pytest.mark.parametrize("argv,message", [
    (["--context-parallel-size", "2"], "--context-parallel-size 2 is not supported: context parallelism is not "
     "built here (sequences are split only by --sequence-parallel over the tensor-parallel ranks); use 1"),
    (["--ckpt-format", "torch"], "--ckpt-format torch is not supported: checkpoints are torch_dist (megatron-core "
     "dist_checkpointing, reshardable across layouts); use --ckpt-format torch_dist"),
    (["--num-experts", "4", "--moe-token-dispatcher-type", "flex"], "--moe-token-dispatcher-type flex is not "
     "supported: it needs DeepEP on GPUs; use alltoall (allgather is accepted and runs the same exchange)"),
    (["--lr-warmup-iters", "2", "--lr-warmup-fraction", "0.1"],
     "give one of --lr-warmup-iters and --lr-warmup-fraction: both set the warm-up length"),
    (["--mock-data"], "--mock-data trains on synthetic tokens: drop --data-path (or --mock-data)"),
])
def test_unsupported_or_contradictory_flags_stop_with_one_line(argv, message):
    assert _message(argv) == message


def test_train_samples_and_the_lr_schedule_in_samples_follow_megatron():
    from stablemoe_megatron.training.optim import schedule_lengths

    config = parse_config([*SIZES, "--data-path", "x", "--train-samples", "1000", "--micro-batch-size", "4",
                           "--global-batch-size", "16", "--lr-warmup-fraction", "0.05"])
    config.validate(2)
    assert config.training.train_iters == 1000 // 16
    # Megatron-LM: decay over --lr-decay-samples (default --train-samples); warm-up = fraction x decay
    assert schedule_lengths(config, 16) == (int(0.05 * 1000), 1000)
    config = parse_config([*SIZES, "--data-path", "x", "--train-samples", "1000", "--micro-batch-size", "4",
                           "--lr-warmup-samples", "96", "--lr-decay-samples", "800"])
    config.validate(1)
    assert (config.training.train_iters, schedule_lengths(config, 4)) == (250, (96, 800))
    config = _validated(["--lr-warmup-iters", "3", "--lr-decay-iters", "8", "--micro-batch-size", "2"])
    assert schedule_lengths(config, 2) == (6, 16)
    with pytest.raises(ConfigError, match=r"^give one of --train-iters and --train-samples$"):
        _validated(["--train-samples", "64"])


def test_a_config_saved_before_the_megatron_semantics_reads_as_the_same_model():
    old = parse_config([*SIZES, "--num-experts", "4", "--moe-layer-freq", "2"]).to_dict()
    del old["model"]["add_bias_linear"]
    import yaml

    config = config_from_yaml_text(yaml.safe_dump(old))
    assert config.model.add_bias_linear is False
    assert sorted(config.moe.moe_placement(4)) == [2, 4]  # the old meaning: layers k, 2k


def test_every_megatron_flag_named_by_the_issue_is_accepted():
    parser_flags = set(build_parser()._option_string_actions)
    named = ("--swiglu --disable-bias-linear --moe-router-topk --recompute-granularity --recompute-method "
             "--recompute-num-layers --recompute-activations --fp16 --train-samples --lr-warmup-fraction "
             "--lr-decay-samples --transformer-impl --ckpt-format --no-load-rng --finetune --mock-data "
             "--moe-token-dispatcher-type --expert-tensor-parallel-size --context-parallel-size "
             "--exit-duration-in-mins --exit-signal-handler --vocab-size").split()
    assert [flag for flag in named if flag not in parser_flags] == []


def _flags(data, tmp_path: Path, **extra):
    # False drops a tiny_flags default: no stage 2, no --train-iters, biases on (Megatron-LM's default)
    return tiny_flags(data, **{"--num-layers": 2, "--moe-stage2-start-iter": False, "--moe-router": "switch",
                                "--moe-layer-freq": 1, "--train-iters": False, "--train-samples": 48,
                                "--swiglu": True, "--disable-bias-linear": False, "--lr-warmup-iters": False,
                                "--lr-warmup-fraction": 0.1, "--metrics-file": tmp_path / "metrics.jsonl",
                                "--use-mcore-models": True, "--no-masked-softmax-fusion": True,
                                "--moe-token-dispatcher-type": "alltoall", **extra})


def test_megatron_style_moe_run_with_biases_and_swiglu_trains(data, tmp_path):
    results, records = run_distributed(train, 2, ep=2, args=(_flags(data, tmp_path),))[-1]
    losses = losses_by_iteration(records)
    assert sorted(losses) == list(range(1, 48 // 8 + 1))  # --train-samples 48 / global batch 8
    assert all(math.isfinite(v) for v in losses.values()) and losses[6] < losses[1]
    assert math.isfinite(results["validation_loss"])


def test_exit_duration_in_mins_saves_and_exits_like_a_signal(data, tmp_path):
    save = tmp_path / "ckpt"
    save.mkdir()
    argv = _flags(data, tmp_path, **{"--save": save, "--load": save, "--exit-duration-in-mins": 1e-6,
                                     "--save-interval": 100})
    results, _ = run_distributed(train, 1, args=(argv,))[-1]
    assert results == {"iteration": 1, "exited_early": True}
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    resumed = _flags(data, tmp_path, **{"--save": save, "--load": save, "--metrics-file": tmp_path / "resumed.jsonl"})
    results, records = run_distributed(train, 1, args=(resumed,))[-1]
    assert results["iteration"] == 6 and min(losses_by_iteration(records)) == 2


@pytest.mark.parametrize("router", ["switch", "stablemoe"])
def test_moe_layers_with_biases_and_swiglu_under_ep2_equal_one_process(router):
    """Megatron layout (MoE in layers 1, 3), linear biases and SwiGLU experts: EP2 equals one process."""
    from test_moe_parallel import TOL, _parallel, _reference

    case = dict(router=router, layout="megatron", model_options=dict(add_bias_linear=True, swiglu=True))
    weights, ref_losses, ref_grads = run_distributed(_reference, world_size=1, args=(case, 2))[0]
    assert any("linear_fc2.bias" in key for key in weights) and any("experts" in key and "bias" in key
                                                                      for key in weights)
    for loss_diff, grad_diff, compared in run_distributed(
            _parallel, world_size=2, ep=2, args=(case, weights, ref_losses, ref_grads)):
        assert loss_diff <= TOL and grad_diff <= TOL, (loss_diff, grad_diff)
        assert any("experts" in key and "bias" in key for key in compared)


def test_flag_table_is_generated_and_every_recorded_flag_is_accepted():
    from stablemoe_megatron.cli.megatron_flags import MEGATRON_FLAGS, document, rows

    assert (Path(__file__).parents[1] / "docs" / "MEGATRON_FLAGS.md").read_text() == document(), \
        "docs/MEGATRON_FLAGS.md is out of date: run python tools/megatron_flags.py --write"
    assert [flag for flag, _, ours, _ in rows() if ours == "not accepted"] == []
    verdicts = {flag: verdict for flag, _, _, verdict in rows()}
    assert verdicts["--clip-grad"] == "same" and verdicts["--context-parallel-size"].startswith("not supported")
    assert len(verdicts) == len(MEGATRON_FLAGS)


def megatron_moe_command_line(data, save: Path, metrics: Path) -> list:
    """A typical Megatron-LM MoE pretrain_gpt.py command line (tiny sizes), as a user would bring it."""
    return [str(a) for a in [
        "--use-mcore-models", "--num-layers", 2, "--hidden-size", 64, "--num-attention-heads", 4,
        "--seq-length", 32, "--max-position-embeddings", 32, "--position-embedding-type", "rope",
        "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
        "--num-experts", 4, "--moe-layer-freq", 1, "--moe-router-topk", 2, "--moe-router-load-balancing-type",
        "aux_loss", "--moe-aux-loss-coeff", 1e-2, "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall",
        "--expert-model-parallel-size", 2, "--recompute-granularity", "full", "--recompute-method", "uniform",
        "--recompute-num-layers", 1, "--bf16", "--attention-softmax-in-fp32", "--no-masked-softmax-fusion",
        "--train-samples", 64, "--micro-batch-size", 4, "--global-batch-size", 8, "--lr", 3e-3,
        "--lr-decay-style", "cosine", "--lr-warmup-fraction", 0.1, "--min-lr", 3e-4, "--weight-decay", 0.1,
        "--clip-grad", 1.0, "--use-distributed-optimizer", "--distributed-backend", "nccl",
        "--data-path", data["prefix"], "--split", "90,10,0", "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", data["tokenizer_model"], "--log-interval", 1, "--eval-interval", 1000,
        "--eval-iters", 1, "--save", save, "--load", save, "--save-interval", 4, "--seed", 1234,
        "--metrics-file", metrics]]


def test_a_typical_megatron_lm_moe_command_line_runs_unchanged(data, tmp_path):
    """swiglu, no bias, top-2 in every layer, full recompute, bf16, --train-samples, the distributed
    optimizer, EP 2: the router is Megatron-LM's softmax top-k (switch), and it trains."""
    save = tmp_path / "ckpt"
    save.mkdir()
    argv = megatron_moe_command_line(data, save, tmp_path / "metrics.jsonl")
    config = parse_config(argv)
    config.validate(2)
    assert (config.moe.router, config.moe.effective_router_topk, config.training.train_iters) == ("switch", 2, 8)
    assert sorted(config.moe.moe_placement(2)) == [1, 2]
    results, records = run_distributed(train, 2, ep=2, args=(argv,))[-1]
    losses = losses_by_iteration(records)
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())
    assert sum(losses[i] for i in (7, 8)) < sum(losses[i] for i in (1, 2))
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    assert math.isfinite(results["validation_loss"])


def test_resume_checks_compare_biases_swiglu_and_the_moe_placement_not_its_spelling(tmp_path):
    from stablemoe_megatron.training.preflight import check_checkpoint_compatible

    base = [*SIZES, "--num-experts", "4"]
    saved = parse_config([*base, "--moe-layer-freq", "2", "--disable-bias-linear"])
    check_checkpoint_compatible(parse_config([*base, "--moe-layer-freq", "[1,0,1,0]", "--disable-bias-linear"]),
                                saved, "ckpt")  # layers 1, 3 either way
    with pytest.raises(ConfigError) as err:
        check_checkpoint_compatible(parse_config([*base, "--moe-layer-freq", "1", "--swiglu"]), saved, "ckpt")
    assert str(err.value) == (
        "--load ckpt holds a different model: --ffn-hidden-size 128 (checkpoint: 256); --swiglu True (checkpoint: "
        "False); linear biases on (checkpoint: off; add --disable-bias-linear); --moe-layer-freq layers 1,2,3,4 "
        "(checkpoint: layers 1,3). Use the checkpoint's settings (see its run_config.yaml).")


def test_aux_loss_coeff_list_in_a_config_file_and_no_power_in_patterns(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("moe-aux-loss-coeff: [0.02]\n")
    assert parse_config(["--config", str(path)]).moe.aux_loss_coeff == 0.02
    assert _message(["--num-experts", "4", "--moe-layer-freq", "[1]*2**2"]).endswith("(no **)")

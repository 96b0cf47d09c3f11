"""``--activation {gelu,relu}``: the backbone MLPs and every expert FFN sublayer apply it, the exported
pure-torch model computes the same function, a checkpoint only resumes with the activation it was
trained with (an old run_config.yaml without the key is gelu), and --help lists the flag."""
import json

import pytest
import torch
import yaml

from stablemoe_megatron.cli_args import build_parser, config_from_yaml_text, parse_config
from stablemoe_megatron.config import RunConfig
from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.export.exporter import export_checkpoint
from stablemoe_megatron.export.model import ExportedGPT
from stablemoe_megatron.export.schema import ExportedConfig, read_config
from stablemoe_megatron.training.preflight import check_checkpoint_compatible
from data_fixtures import tiny_dataset
from distributed import run_distributed
from test_convert_helpers import base_flags, random_checkpoint, token_batch
from test_export_model import LOGIT_TOLERANCE
from trainer_cases import tiny_flags, train

FUNCTIONS = {"gelu": torch.nn.functional.gelu, "relu": torch.relu}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("activation_data"))


def _plain_ffn(x, fc1, fc2, activation):
    """fc2(act(fc1(x))) without biases, from the weights alone."""
    return FUNCTIONS[activation](x @ fc1.t()) @ fc2.t()


def _ffn_differences(activation):
    """Worker: max |megatron - plain torch| of a backbone MLP and of an expert FFN sublayer.

    Also returns how far the outputs are from the OTHER activation's plain computation, so the
    test knows the comparison can tell the two functions apart.
    """
    from megatron.core.transformer.mlp import MLP

    from stablemoe_megatron.model.config import ModelConfig
    from stablemoe_megatron.model.gpt import build_model, transformer_config
    from stablemoe_megatron.moe.config import MoEConfig

    model_cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                            activation=activation, hidden_dropout=0.0, attention_dropout=0.0,
                            add_bias_linear=False)
    # a zero fc2 (the default) outputs 0 under either activation: the check needs a non-zero expert
    moe = MoEConfig(num_experts=4, router="stablemoe", sublayers_per_expert=2, expert_output_init="normal")
    model = build_model(model_cfg, moe, 128, transformer_config(model_cfg, moe))
    other = "gelu" if activation == "relu" else "relu"
    gen = torch.Generator().manual_seed(3)
    result = {}
    with torch.no_grad():
        dense = next(layer.mlp for layer in model.decoder.layers if type(layer.mlp) is MLP)
        x = torch.randn(5, 2, 32, generator=gen)
        out, _ = dense(x)
        fc1, fc2 = dense.linear_fc1.weight, dense.linear_fc2.weight
        result["dense"] = ((out - _plain_ffn(x, fc1, fc2, activation)).abs().max().item(),
                           (out - _plain_ffn(x, fc1, fc2, other)).abs().max().item())
        sublayer = model.moe_layers[0].experts.sublayers[1]
        counts = torch.tensor([3, 1, 0, 4])
        rows = torch.randn(int(counts.sum()), 32, generator=gen)
        out, _ = sublayer(rows, counts, torch.ones(rows.shape[0]))
        expected, unexpected = [], []
        for expert, chunk in zip(sublayer.local_experts, rows.split(counts.tolist())):
            fc1, fc2 = expert.linear_fc1.weight, expert.linear_fc2.weight
            expected.append(_plain_ffn(chunk, fc1, fc2, activation))
            unexpected.append(_plain_ffn(chunk, fc1, fc2, other))
        result["expert"] = ((out - torch.cat(expected)).abs().max().item(),
                            (out - torch.cat(unexpected)).abs().max().item())
    return result


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_backbone_mlp_and_expert_sublayer_apply_the_activation(activation):
    result = run_distributed(_ffn_differences, 1, args=(activation,))[0]
    for where, (same, other) in result.items():
        assert same < 1e-6, (where, same)
        assert other > 1e-3, (where, other)  # the check distinguishes gelu from relu


EXPORT_CASES = {
    "paper-layout-stablemoe": ["--num-experts", 4, "--moe-router", "stablemoe", "--moe-sublayers-per-expert", 2],
    "megatron-layout-switch": ["--num-experts", 4, "--moe-router", "switch", "--moe-layer-freq", 2],
}


@pytest.mark.parametrize("name", sorted(EXPORT_CASES))
def test_exported_relu_model_equals_megatron(data, tmp_path, name):
    argv = base_flags(data, "--activation", "relu", *EXPORT_CASES[name])
    ids = token_batch()
    reference = run_distributed(random_checkpoint, 1, args=(argv, str(tmp_path / "ckpt"), ids, 1))[0]
    config = export_checkpoint(tmp_path / "ckpt", tmp_path / "export", log=lambda _message: None)
    assert config.activation == "relu"
    assert json.loads((tmp_path / "export" / "config.json").read_text())["activation"] == "relu"
    with torch.no_grad():
        difference = (ExportedGPT.from_pretrained(tmp_path / "export")(ids) - reference).abs().max().item()
    assert difference < LOGIT_TOLERANCE, difference

    # A config.json without the key (exports made before the option) means gelu: another function.
    path = tmp_path / "export" / "config.json"
    values = json.loads(path.read_text())
    del values["activation"]
    path.write_text(json.dumps(values))
    assert read_config(tmp_path / "export").activation == "gelu"
    with torch.no_grad():
        as_gelu = (ExportedGPT.from_pretrained(tmp_path / "export")(ids) - reference).abs().max().item()
    assert as_gelu > 100 * LOGIT_TOLERANCE, as_gelu


def test_unknown_exported_activation_is_refused():
    config = ExportedConfig(vocab_size=8, tokenizer_vocab_size=8, num_layers=1, hidden_size=8,
                            ffn_hidden_size=16, num_attention_heads=2, num_query_groups=2, kv_channels=4,
                            max_position_embeddings=4, position_embedding_type="learned_absolute",
                            normalization="LayerNorm", layernorm_epsilon=1e-5, tie_word_embeddings=True,
                            dtype="float32", activation="silu")
    with pytest.raises(ConfigError, match="activation 'silu'"):
        ExportedGPT(config)


def _sized() -> RunConfig:
    config = RunConfig()
    config.model.num_layers, config.model.hidden_size, config.model.num_attention_heads = 2, 32, 4
    config.model.seq_length = 16
    return config


def test_old_run_config_without_the_key_is_gelu_and_another_activation_is_refused():
    values = _sized().to_dict()
    del values["model"]["activation"]
    saved = config_from_yaml_text(yaml.safe_dump(values))
    assert saved.model.activation == "gelu"
    check_checkpoint_compatible(_sized(), saved, "old_ckpt")  # same model: no error
    relu = _sized()
    relu.model.activation = "relu"
    with pytest.raises(ConfigError, match=r"--activation relu \(checkpoint: gelu\)"):
        check_checkpoint_compatible(relu, saved, "old_ckpt")


def test_resuming_a_gelu_checkpoint_with_relu_is_refused(data, tmp_path, monkeypatch, capsys):
    from stablemoe_megatron.train import main

    run_dir = tmp_path / "run"
    run_distributed(train, 1, args=(tiny_flags(data, **{"--train-iters": 2, "--moe-stage2-start-iter": 1,
                                                         "--save": run_dir}),))
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    code = main(tiny_flags(data, **{"--load": run_dir, "--activation": "relu", "--train-iters": 4,
                                    "--moe-stage2-start-iter": 1}))
    err = capsys.readouterr().err
    assert code == 2 and "holds a different model" in err and "--activation relu (checkpoint: gelu)" in err, err


def test_help_lists_the_flag_and_its_choices():
    text = build_parser().format_help()
    entry = text.split("\n  --activation {gelu,relu}", 1)[1].split("\n  --", 1)[0]
    entry = " ".join(entry.split())
    assert "backbone MLPs" in entry and "expert" in entry and "relu matches the authors" in entry and "(default: gelu)" in entry, entry
    assert parse_config(["--activation", "relu"]).model.activation == "relu"
    assert parse_config([]).model.activation == "gelu"
    with pytest.raises(SystemExit):
        parse_config(["--activation", "silu"])

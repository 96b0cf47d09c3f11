"""The encoder-decoder (translation) model: training through both stages with EP 2 and an exact
resume, the same function under TP / SP / EP / DP as in one process, each stack's distilled router
reading its own token ids, the label-smoothed loss against fairseq's formula, and the data and
layout errors."""
import math

import pytest

from distributed import run_distributed
from mt_cases import VOCAB, mt_flags, parallel_data, write_pair
from trainer_cases import losses_by_iteration, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return parallel_data(tmp_path_factory.mktemp("mt_data"))


def _run(argv, world):
    return run_distributed(train, world, args=(argv,))[-1]


def test_trains_through_both_stages_with_ep2_and_resumes_exactly(data, tmp_path):
    """2 processes, EP 2, the default token shuffle and dropout 0.1; stopped at the stage switch."""
    def flags(run, name, **extra):
        return mt_flags(data, **{"--expert-model-parallel-size": 2, "--hidden-dropout": 0.1,
                                 "--attention-dropout": 0.1, "--save": run / "ckpt", "--load": run / "ckpt",
                                 "--save-interval": 6, "--metrics-file": run / f"{name}.jsonl",
                                 "--routing-probe-interval": 3, "--routing-probe-tokens": 64, **extra})
    full, part = tmp_path / "full", tmp_path / "part"
    for d in (full, part):
        (d / "ckpt").mkdir(parents=True)
    results, records = _run(flags(full, "full"), 2)
    reference = losses_by_iteration(records)
    stages = {r["iteration"]: r["stage"] for r in records if "stage" in r}
    assert stages[6] == 1 and stages[12] == 2
    assert reference[12] < reference[1]
    probes = [r["routing_probe"] for r in records if "routing_probe" in r]
    assert {layer["layer"] for layer in probes[-1]["layers"]} == {1, 3}  # encoder layer 1, decoder 2 + 1
    after_switch = [p for p in probes if p["iteration"] > 6]
    assert all(layer["changed_fraction"] == 0.0 for p in after_switch[1:] for layer in p["layers"])
    first, _ = _run(flags(part, "first", **{"--exit-interval": 6}), 2)
    assert first["iteration"] == 6
    resumed_results, records = _run(flags(part, "second"), 2)
    resumed = losses_by_iteration(records)
    assert sorted(resumed) == list(range(7, 13))
    assert all(resumed[i] == reference[i] for i in resumed), (resumed, reference)
    assert resumed_results["validation_loss"] == results["validation_loss"]


def _eval(load, flags):
    from stablemoe_megatron.evaluate import run

    return run(["--load", str(load), "--eval-iters", "4", *flags])["loss"]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("mt_trained")
    _run(mt_flags(data, **{"--save": run / "ckpt", "--save-interval": 12, "--hidden-dropout": 0.0,
                           "--attention-dropout": 0.0, "--train-iters": 8}), 1)
    return run / "ckpt"


@pytest.mark.parametrize("world,flags", [
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    (2, ["--expert-model-parallel-size", "2"]),
    (2, []),
], ids=["tp2-sp", "ep2", "dp2"])
def test_same_function_under_tp_ep_dp_as_one_process(trained, world, flags):
    reference = run_distributed(_eval, 1, args=(trained, []))[0]
    losses = run_distributed(_eval, world, args=(trained, flags))
    assert math.isfinite(reference)
    for loss in losses:
        assert abs(loss - reference) < 1e-5, (flags, loss, reference)


def test_pipeline_parallel_is_refused_with_the_reason(data, tmp_path):
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.errors import ConfigError

    config = parse_config(mt_flags(data, **{"--pipeline-model-parallel-size": 2}))
    with pytest.raises(ConfigError) as err:
        config.validate(2)
    assert str(err.value) == (
        "--model-family encoder_decoder with --pipeline-model-parallel-size > 1 is not supported: "
        "megatron-core 0.16's pipeline schedules pass one activation between stages, an encoder-decoder "
        "stage needs two (decoder state and encoder output); use tensor, expert and data parallelism "
        "(--pipeline-model-parallel-size 1)")


def test_misaligned_pair_names_both_files_and_counts(data, tmp_path):
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.errors import ConfigError
    from stablemoe_megatron.training.preflight import preflight

    prefix = write_pair(tmp_path / "bad", 10, target_count=9)
    config = parse_config(mt_flags(data, **{"--data-path": prefix}))
    with pytest.raises(ConfigError) as err:
        preflight(config, 1)
    assert str(err.value) == (
        f"--data-path {prefix}: {prefix}_src_document.idx holds 10 sentences but {prefix}_tgt_document.idx "
        f"holds 9: the two sides are not aligned; re-run preprocess_data on the parallel .jsonl with "
        f"--json-keys src tgt")


def _stage_two_routing(argv):
    """Build the model (stage 2), route one batch; per stack: (routed expert of every token,
    the distilled table's expert of its own ids, of the other stack's ids)."""
    import torch

    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.training.build import build

    config = parse_config(argv)
    trainer = build(config, "evaluate")
    model = trainer.model
    model.enter_stage_two()
    model.eval()
    gen = torch.Generator().manual_seed(0)
    source = torch.randint(0, VOCAB, (3, 12), generator=gen)
    target = torch.randint(0, VOCAB, (3, 12), generator=gen)
    for layer in model.moe_layers:
        layer.keep_last_decision = True
    with torch.no_grad():
        model(source, target, torch.zeros(3, 12, dtype=torch.bool))
    out = {}
    for name, layers, own, other in (("encoder", model.encoder_moe_layers, source, target),
                                     ("decoder", model.decoder_moe_layers, target, source)):
        layer = layers[0]
        decision = layer.last_decision
        routed = torch.full((own.numel(),), -1)
        routed[decision.token_index] = decision.expert_index.reshape(-1)
        table = layer.router.distilled.scores(torch.arange(VOCAB + 1).view(1, -1))[0].argmax(-1)
        out[name] = (routed, table[own.t().reshape(-1)], table[other.t().reshape(-1)])
    trainer.release()
    return out


def test_each_stack_routes_by_its_own_token_ids_in_stage_two(data):
    """Encoder MoE: the source ids; decoder MoE: the target-prefix ids (a control: the other
    stack's ids give another assignment)."""
    result = run_distributed(_stage_two_routing, 1, args=(mt_flags(data),))[0]
    for name, (routed, own, other) in result.items():
        assert (routed >= 0).all(), name
        assert routed.tolist() == own.tolist(), name
        assert routed.tolist() != other.tolist(), name


def _smoothed_losses(argv):
    """(model's training-mode per-token loss, fairseq's label_smoothed_nll_loss on the same logits,
    evaluation-mode loss, plain NLL)."""
    import torch
    import torch.nn.functional as F

    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.training.build import build

    config = parse_config(argv)
    trainer = build(config, "evaluate")
    model = trainer.model
    gen = torch.Generator().manual_seed(1)
    source = torch.randint(0, VOCAB, (2, 12), generator=gen)
    target = torch.randint(0, VOCAB, (2, 12), generator=gen)
    labels = torch.randint(0, VOCAB, (2, 12), generator=gen)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    model.train()
    with torch.no_grad():
        torch.manual_seed(0)
        train_loss = model(source, target, padding, labels)
        torch.manual_seed(0)
        logits = model(source, target, padding)  # [B, T, V]
    model.eval()
    with torch.no_grad():
        eval_loss = model(source, target, padding, labels)
        eval_logits = model(source, target, padding)
    eps, lprobs = config.training.label_smoothing, F.log_softmax(logits.float(), dim=-1)
    nll = -lprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    smooth = -lprobs.sum(-1)
    eps_i = eps / (lprobs.shape[-1] - 1)
    fairseq = (1.0 - eps - eps_i) * nll + eps_i * smooth
    plain = F.cross_entropy(eval_logits.float().transpose(1, 2), labels, reduction="none")
    trainer.release()
    return train_loss, fairseq, eval_loss, plain


def test_label_smoothing_is_fairseqs_in_training_and_off_in_evaluation(data):
    train_loss, fairseq, eval_loss, plain = run_distributed(
        _smoothed_losses, 1, args=(mt_flags(data, **{"--hidden-dropout": 0.0, "--attention-dropout": 0.0}),))[0]
    assert (train_loss - fairseq).abs().max() < 1e-4, (train_loss - fairseq).abs().max()
    assert (eval_loss - plain).abs().max() < 1e-4
    assert (train_loss - eval_loss).abs().max() > 1e-2  # the smoothing is not a no-op

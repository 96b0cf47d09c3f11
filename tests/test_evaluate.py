"""stablemoe-eval: any number of processes for any checkpoint layout, its own output (never the training
run's metrics file), and a --full-split mode that scores every sample of the split once."""
import json

import pytest

from data_fixtures import tiny_dataset
from distributed import run_distributed
from trainer_cases import tiny_flags, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("evaluate_data"))


@pytest.fixture(scope="module")
def ep2_run(data, tmp_path_factory):
    """A checkpoint trained on 2 ranks with expert parallelism 2, with a metrics file."""
    root = tmp_path_factory.mktemp("ep2_run")
    argv = tiny_flags(data, **{"--train-iters": 4, "--moe-stage2-start-iter": 2, "--save": root / "ckpt",
                               "--expert-model-parallel-size": 2, "--metrics-file": root / "metrics.jsonl",
                               "--global-batch-size": 8})
    run_distributed(train, 2, args=(argv,))
    return root


def _eval(argv):
    from stablemoe_megatron.evaluate import run

    return run([str(a) for a in argv])


def test_ep2_checkpoint_on_one_process_equals_two(data, ep2_run, capsys):
    argv = ["--load", ep2_run / "ckpt", "--eval-iters", "2"]
    one = run_distributed(_eval, 1, args=(argv,))[0]
    two = run_distributed(_eval, 2, args=(argv,))
    assert one["iteration"] == 4 and one["samples"] == 16
    for result in two:
        assert abs(result["loss"] - one["loss"]) < 1e-5, (result, one)


def test_layout_choice():
    from stablemoe_megatron.config import RunConfig
    from stablemoe_megatron.evaluate import choose_layout

    config = RunConfig()
    config.model.num_layers, config.model.hidden_size, config.model.num_attention_heads = 2, 32, 4
    config.model.seq_length = 32
    config.moe.num_experts = 4
    config.parallel.expert_model_parallel_size = 2
    note = choose_layout(config, 1, explicit=False)
    assert config.parallel.expert_model_parallel_size == 1
    assert note.startswith("the checkpoint's layout (TP 1, PP 1, EP 2) does not fit 1 process(es)")
    config.parallel.expert_model_parallel_size = 2
    assert choose_layout(config, 2, explicit=False) is None and config.parallel.expert_model_parallel_size == 2


def test_evaluation_never_writes_the_training_runs_metrics(data, ep2_run, tmp_path):
    metrics = ep2_run / "metrics.jsonl"
    before = metrics.read_bytes()
    output = tmp_path / "result.json"
    for _ in range(2):
        result = run_distributed(_eval, 1, args=(["--load", ep2_run / "ckpt", "--eval-split", "valid",
                                                  "--output", output],))[0]
    assert metrics.read_bytes() == before
    written = json.loads(output.read_text())
    assert written["loss"] == pytest.approx(result["loss"]) and written["split"] == "valid"


def test_full_split_scores_every_complete_global_batch(data, ep2_run):
    full = run_distributed(_eval, 1, args=(["--load", ep2_run / "ckpt", "--full-split"],))[0]
    split, gbs = full["split_samples"], 8
    assert full["samples"] == (split // gbs) * gbs and split - full["samples"] < gbs
    assert full["tokens"] == full["samples"] * 32
    # the same samples scored as --eval-iters batches of a one-epoch split give the same loss
    partial = run_distributed(_eval, 1, args=(["--load", ep2_run / "ckpt", "--eval-iters", split // gbs],))[0]
    assert partial["samples"] == full["samples"]
    assert abs(partial["loss"] - full["loss"]) < 1e-4, (partial, full)


def test_missing_load_is_one_line(capsys, monkeypatch):
    from stablemoe_megatron.evaluate import main

    monkeypatch.setenv("RANK", "0")
    assert main(["--eval-split", "test"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("stablemoe-eval: error: --load is required: the checkpoint (run directory or iter_* "
                   "directory) to evaluate")


def test_model_flags_are_refused_at_evaluation(ep2_run, capsys):
    from stablemoe_megatron.evaluate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--load", str(ep2_run / "ckpt"), "--num-layers", "3"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --num-layers 3" in capsys.readouterr().err


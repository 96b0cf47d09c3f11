"""Model sizes and recipes as config files (configs/*.yaml): every recipe of examples/ and
examples/ablations/ resolves, at every size and with the environment overrides, to exactly the trainer
config it resolved to before the sizes moved into the files (tests/data/recipe_configs.json, the
reference: value AND type of every setting, and the torchrun launcher arguments); reproduce's and the
benchmarks' sizes are the files' values; the loader API (stablemoe_megatron.size_configs).

The reference is regenerated only when a size or recipe is changed on purpose:
    python tests/test_configs.py --write
"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "tests" / "data" / "recipe_configs.json"
BASE_DATA = {"DATA_PATH": "/data/owt_text_document", "VOCAB_FILE": "/data/gpt2-vocab.json",
             "MERGE_FILE": "/data/gpt2-merges.txt"}
# every variable the recipes read: a case sets its own, the caller's environment never leaks in
RECIPE_VARIABLES = ("SIZE", "CONFIG_FILE", "RUN_NAME", "RUN_DIR", "DATA_PATH", "DATA_DIR", "SPLIT", "TOKENIZER_FLAGS",
                    "VOCAB_FILE", "MERGE_FILE", "NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "TP",
                    "PP", "EP", "EXPERTS", "TRAIN_ITERS", "MICRO", "SEED", "POSITIONS", "POSITION", "DISTILL",
                    "STAGE1_FRACTION", "STAGE1", "DISTILL_ROUTER", "DISTILL_LAYERS", "HASH_TABLE",
                    "CAPACITY_FACTOR", "ROUTER", "DRY_RUN", "SLURM_JOB_ID", "PROBE_INTERVAL", "PROBE_TOKENS",
                    "OUTPUT")
METHODS = ("pretrain_dense.sh", "pretrain_switch.sh", "pretrain_base.sh", "pretrain_hash.sh",
           "pretrain_expert_choice.sh", "pretrain_stablemoe.sh")
ABLATIONS = ("moe_position.sh", "stage1_length.sh", "distilled_router.sh", "stage1_only.sh",
             "base_distill_freeze.sh", "num_experts.sh")


def _cases():
    """(id, script, environment, extra trainer arguments)."""
    cases = []
    for size in ("tiny", "base", "large"):
        data = {} if size == "tiny" else BASE_DATA
        for script in METHODS:
            cases.append((f"{script}-{size}", f"examples/{script}", dict(data, SIZE=size), []))
        for script in ABLATIONS:
            cases.append((f"ablations/{script}-{size}", f"examples/ablations/{script}", dict(data, SIZE=size), []))
    variants = [
        ("moe_position.sh", {"POSITION": "scattered"}), ("moe_position.sh", {"POSITION": "top"}),
        ("moe_position.sh", {"POSITION": "bottom"}), ("stage1_length.sh", {"STAGE1": "25"}),
        ("stage1_length.sh", {"STAGE1": "50", "DISTILL_ROUTER": "cnn"}),
        ("distilled_router.sh", {"DISTILL_ROUTER": "cnn"}),
        ("distilled_router.sh", {"DISTILL_ROUTER": "transformer", "DISTILL_LAYERS": "1"}),
        ("num_experts.sh", {"EXPERTS": "16", "ROUTER": "base"}), ("num_experts.sh", {"EXPERTS": "64", "ROUTER": "hash"}),
        ("stage1_only.sh", {"DISTILL_ROUTER": "cnn"}),
    ]
    for script, env in variants:
        label = ",".join(f"{k}={v}" for k, v in env.items())
        cases.append((f"ablations/{script}-tiny-{label}", f"examples/ablations/{script}", dict(env, SIZE="tiny"), []))
    overrides = [  # (script, environment, extra arguments): the environment overrides and trailing flags
        ("pretrain_stablemoe.sh", {"SIZE": "tiny", "TRAIN_ITERS": "100", "SEED": "7"}, []),
        ("pretrain_stablemoe.sh", {"SIZE": "tiny", "STAGE1_FRACTION": "none"}, []),
        ("pretrain_stablemoe.sh", {"SIZE": "tiny", "EXPERTS": "2", "NPROC": "1"}, []),
        ("pretrain_stablemoe.sh", {"SIZE": "tiny", "EP": "1"}, ["--log-interval", "5", "--lr", "2e-3", "--bf16"]),
        ("pretrain_stablemoe.sh", dict(BASE_DATA, SIZE="base", EXPERTS="16", MICRO="4", TRAIN_ITERS="1000",
                                       STAGE1_FRACTION="0.25", NNODES="2", MASTER_ADDR="node001",
                                       NODE_RANK="1", SLURM_JOB_ID="77"), []),
        ("pretrain_switch.sh", dict(BASE_DATA, SIZE="large", TP="2", PP="2", NPROC="8"), []),
        ("pretrain_switch.sh", dict(BASE_DATA, SIZE="large", MICRO="2", SEED="3", SPLIT="98,1,1"), []),
        ("pretrain_dense.sh", dict(BASE_DATA, SIZE="base", TP="2", EXPERTS="16", TRAIN_ITERS="500", MICRO="2"), []),
        ("pretrain_dense.sh", {"SIZE": "tiny", "TRAIN_ITERS": "50", "SEED": "9", "EXPERTS": "8"}, []),
        ("pretrain_base.sh", {"SIZE": "tiny", "DISTILL": "1", "STAGE1_FRACTION": "0.5"}, []),
        ("pretrain_expert_choice.sh", {"SIZE": "tiny", "CAPACITY_FACTOR": "1", "POSITIONS": "top"}, []),
        ("pretrain_hash.sh", {"SIZE": "tiny", "HASH_TABLE": "frequency", "EXPERTS": "8"}, []),
        ("pretrain_hash.sh", {"SIZE": "tiny", "DATA_PATH": "0.5 /d/a_text_document 0.5 /d/b_text_document",
                              "TOKENIZER_FLAGS": "--tokenizer-type SentencePieceTokenizer --tokenizer-model /d/x.model"},
         []),
        ("pretrain_stablemoe.sh", dict(BASE_DATA, SIZE="large", DISTILL_ROUTER="transformer", EXPERTS="32"), []),
    ]
    for script, env, extra in overrides:
        label = ",".join(f"{k}={v}" for k, v in env.items() if k not in BASE_DATA) + (" " + " ".join(extra) if extra else "")
        cases.append((f"{script}-{label}", f"examples/{script}", env, extra))
    # the README's quick start (its corpus preparation finds the datasets and does nothing)
    cases.append(("quickstart_cpu.sh", "examples/quickstart_cpu.sh", {}, []))
    cases.append(("quickstart_cpu.sh-PROBE_INTERVAL=5", "examples/quickstart_cpu.sh", {"PROBE_INTERVAL": "5"},
                  ["--train-iters", "60"]))
    return cases


CASES = _cases()


def _placeholders(value, tmp: str):
    if isinstance(value, str):
        return value.replace(tmp, "<TMP>")
    if isinstance(value, list):
        return [_placeholders(v, tmp) for v in value]
    if isinstance(value, dict):
        return {k: _placeholders(v, tmp) for k, v in value.items()}
    return value


def resolve(script: str, variables: dict, extra, tmp: Path) -> dict:
    """The dry run's torchrun launcher arguments and the trainer's resolved config (to_dict)."""
    from stablemoe_megatron.cli_args import parse_config

    data_dir = tmp / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in ("spm.model", *(f"corpus_{s}_text_document.idx" for s in ("train", "valid", "test"))):
        (data_dir / name).touch()  # prepare_corpus.sh (quick start) finds them and does nothing
    env = {k: v for k, v in os.environ.items() if k not in RECIPE_VARIABLES}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.update(variables, DRY_RUN="1", RUN_DIR=str(tmp / "run"), DATA_DIR=str(data_dir))
    done = subprocess.run(["bash", str(REPO / script), *extra], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    (command,) = [shlex.split(line) for line in done.stdout.splitlines() if line.startswith("torchrun ")]
    at = command.index("-m")
    assert command[at + 1] == "stablemoe_megatron.train"
    config = parse_config(command[at + 2:]).to_dict()
    return _placeholders({"launcher": command[:at], "config": config}, str(tmp))


def _typed(value):
    """Values with their types, so that 0 and 0.0 or 1e-3 and "1e-3" differ."""
    if isinstance(value, dict):
        return {k: _typed(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_typed(v) for v in value]
    return (type(value).__name__, value)


def reproduce_configs(tmp: Path) -> dict:
    """tools/reproduce.py: every variant's resolved trainer config, with the default and other arguments."""
    from stablemoe_megatron.cli import reproduce
    from stablemoe_megatron.cli_args import parse_config

    out = {}
    for label, argv in (("default", []), ("keep", ["--keep-checkpoints", "--train-iters", "100", "--nproc", "1",
                                                   "--eval-iters", "3", "--seed", "5"])):
        args = reproduce.build_parser().parse_args([*argv, "--data-dir", str(tmp / "data")])
        for name in reproduce.VARIANTS:
            flags = reproduce.train_flags(name, tmp / name, args)
            out[f"{label}:{name}"] = _placeholders(parse_config(flags).to_dict(), str(tmp))
    return out


def _bench(name: str):
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import importlib

    return importlib.import_module(f"bench.{name}")


def bench_configs():
    """bench/step_time.py and bench/throughput.py: their size tables, and every resolved trainer config."""
    from stablemoe_megatron.cli_args import parse_config

    step_time, throughput = _bench("step_time"), _bench("throughput")
    sizes = {"step_time": step_time.SIZES, "throughput": throughput.SIZES}
    out = {}
    for size_name, size in step_time.SIZES.items():
        for variant in step_time.ALL_VARIANTS:
            flags = step_time.base_flags(size) + step_time.variant_flags(variant, size)
            out[f"step_time:{size_name}:{variant}"] = parse_config(flags).to_dict()
    for size_name, size in throughput.SIZES.items():
        for router in ("stablemoe", "switch", "hash", "base", "expert-choice", "dense"):
            for accumulate in (1, 4):
                out[f"throughput:{size_name}:{router}:{accumulate}"] = parse_config(
                    throughput.flags(size, router, accumulate)).to_dict()
    return sizes, out


# The reference file: {"defaults": the trainer's defaults when it was written, "recipes": {case: {"launcher",
# "config": the settings that differ from those defaults}}, "reproduce": {...}, "bench": {...}, "bench_sizes"}.
def _reference() -> dict:
    return json.loads(REFERENCE.read_text())


def _changes(config: dict, defaults: dict) -> dict:
    """The settings of ``config`` that differ from ``defaults`` in value or type."""
    out = {}
    for section, values in config.items():
        changed = {k: v for k, v in values.items() if _typed(v) != _typed(defaults[section].get(k, object()))}
        if changed:
            out[section] = changed
    return out


def _assert_reference_config(got: dict, changes: dict, reference_defaults: dict):
    """``got`` (a to_dict) is the reference defaults plus ``changes``, value and type; a setting added to the
    config tree after the reference was written must keep its (current) default."""
    from stablemoe_megatron.config import RunConfig

    current = RunConfig().to_dict()
    assert got.keys() >= reference_defaults.keys()
    for section, values in got.items():
        assert values.keys() >= reference_defaults.get(section, {}).keys(), f"{section}: a setting was removed"
        expected = {**current[section], **reference_defaults.get(section, {}), **changes.get(section, {})}
        assert values == expected, section
        assert _typed(values) == _typed(expected), section


def test_reference_covers_every_case_and_recipe():
    reference = _reference()
    assert sorted(reference["recipes"]) == sorted(case[0] for case in CASES)
    scripts = {case[1] for case in CASES}
    recipes = {str(p.relative_to(REPO)) for p in [*REPO.glob("examples/*.sh"), *REPO.glob("examples/ablations/*.sh")]}
    untested = recipes - scripts - {"examples/common.sh", "examples/prepare_corpus.sh",
                                    "examples/prepare_large_corpus.sh",  # data preparation, no trainer
                                    "examples/reproduce_paper_cpu.sh",  # tools/reproduce.py, below
                                    # translation (tests/test_mt_recipes.py): no LM reference config
                                    "examples/prepare_mt_corpus.sh", "examples/translate.sh",
                                    "examples/reproduce_mt_cpu.sh"}
    assert not untested, untested


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_recipe_resolves_to_the_reference_config(case, tmp_path):
    name, script, variables, extra = case
    got = resolve(script, variables, extra, tmp_path)
    reference = _reference()
    want = reference["recipes"][name]
    assert got["launcher"] == want["launcher"]
    _assert_reference_config(got["config"], want["config"], reference["defaults"])


def test_reproduce_variants_resolve_to_the_reference_configs(tmp_path):
    got, reference = reproduce_configs(tmp_path), _reference()
    assert sorted(got) == sorted(reference["reproduce"])
    for key, config in got.items():
        _assert_reference_config(config, reference["reproduce"][key], reference["defaults"])


def test_bench_sizes_and_configs_are_the_reference():
    sizes, configs = bench_configs()
    reference = _reference()
    assert _typed(sizes) == _typed(reference["bench_sizes"])
    assert sorted(configs) == sorted(reference["bench"])
    for key, config in configs.items():
        _assert_reference_config(config, reference["bench"][key], reference["defaults"])


def dump_reference(out: dict) -> str:
    """JSON with one line per entry (readable diffs)."""
    lines = ["{"]
    for i, (top, entries) in enumerate(sorted(out.items())):
        lines.append(f" {json.dumps(top)}: {{")
        items = sorted(entries.items())
        for j, (key, value) in enumerate(items):
            lines.append(f"  {json.dumps(key)}: {json.dumps(value, sort_keys=True)}" + ("," if j < len(items) - 1 else ""))
        lines.append(" }" + ("," if i < len(out) - 1 else ""))
    return "\n".join(lines + ["}"]) + "\n"


def write_reference() -> None:
    import tempfile

    from stablemoe_megatron.config import RunConfig

    defaults = RunConfig().to_dict()
    out = {"defaults": defaults, "recipes": {}}
    for case_name, case_script, case_env, case_extra in CASES:
        with tempfile.TemporaryDirectory() as case_tmp:
            got = resolve(case_script, case_env, case_extra, Path(case_tmp))
        out["recipes"][case_name] = {"launcher": got["launcher"], "config": _changes(got["config"], defaults)}
    with tempfile.TemporaryDirectory() as case_tmp:
        out["reproduce"] = {k: _changes(v, defaults) for k, v in reproduce_configs(Path(case_tmp)).items()}
    sizes, configs = bench_configs()
    out["bench_sizes"] = sizes
    out["bench"] = {k: _changes(v, defaults) for k, v in configs.items()}
    REFERENCE.parent.mkdir(parents=True, exist_ok=True)
    REFERENCE.write_text(dump_reference(out))
    print(f"{len(out['recipes'])} recipe cases, {len(out['reproduce'])} reproduce, {len(out['bench'])} bench "
          f"-> {REFERENCE}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------
# the files and their readers agree
# ------------------------------------------------------------------------------------------------
def _shape(name: str) -> dict:
    from stablemoe_megatron.size_configs import load_size

    c = load_size(name)
    return dict(layers=c["model"]["num_layers"], hidden=c["model"]["hidden_size"], ffn=c["model"]["ffn_hidden_size"],
                heads=c["model"]["num_attention_heads"], seq=c["model"]["seq_length"],
                experts=c["moe"]["num_experts"], sublayers=c["moe"]["sublayers_per_expert"],
                micro=c["training"]["micro_batch_size"], bf16=c["training"]["bf16"])


def test_bench_sizes_are_the_config_files():
    step_time, throughput = _bench("step_time"), _bench("throughput")
    for sizes in (step_time.SIZES, throughput.SIZES):
        for bench_name, config_name in (("tiny", "tiny"), ("paper", "base")):
            size = dict(sizes[bench_name])
            assert size.pop("vocab") in (8000, 50257)
            assert size == _shape(config_name), bench_name


def test_reproduce_uses_the_tiny_file(tmp_path):
    from stablemoe_megatron.cli import reproduce
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.size_configs import load_size

    tiny = load_size("tiny")
    assert reproduce.tiny_size() == tiny
    args = reproduce.build_parser().parse_args(["--data-dir", str(tmp_path)])
    config = parse_config(reproduce.train_flags("stablemoe", tmp_path / "run", args))
    for section in ("model", "moe", "optimizer", "training", "logging"):
        for key, value in tiny[section].items():
            if (section, key) not in {("optimizer", "lr_warmup_iters"), ("training", "train_iters"),
                                      ("training", "eval_interval"), ("training", "eval_iters"),
                                      ("logging", "log_interval")}:  # reproduce's own --log-interval
                assert getattr(getattr(config, section), key) == value, (section, key)


def test_files_hold_the_papers_settings():
    from stablemoe_megatron.size_configs import available_sizes, load_size

    assert available_sizes() == ["base", "large", "mt_base", "mt_tiny", "tiny"]
    for name in ("base", "large"):
        c = load_size(name)
        assert c["training"]["global_batch_size"] * c["model"]["seq_length"] == 512 * 1024  # 512K tokens
        assert (c["training"]["train_iters"], c["training"]["bf16"], c["optimizer"]["lr_warmup_iters"]) == (60000, True, 2000)
    assert _shape("base") == dict(layers=12, hidden=768, ffn=3072, heads=12, seq=1024, experts=32, sublayers=3, micro=8,
                                  bf16=True)
    assert _shape("large") == dict(layers=24, hidden=1024, ffn=4096, heads=16, seq=1024, experts=64, sublayers=6,
                                   micro=4, bf16=True)
    for name in ("tiny", "base", "large"):
        c = load_size(name)
        assert set(c) == {"model", "moe", "optimizer", "training", "checkpoint", "logging"}  # no data, paths, layout
        assert (c["optimizer"]["adam_beta1"], c["optimizer"]["adam_beta2"], c["optimizer"]["clip_grad"],
                c["optimizer"]["weight_decay"], c["model"]["hidden_dropout"]) == (0.9, 0.98, 0.1, 0.0, 0.0)
        assert c["model"]["activation"] == "relu"  # the authors' run (docs/RECIPE.md rows 6 and 15)
    mt = load_size("mt_base")  # the paper's translation setting (Table 8)
    assert mt["model"] == dict(mt["model"], model_family="encoder_decoder", num_layers=6, hidden_size=512,
                               ffn_hidden_size=2048, num_attention_heads=8, encoder_seq_length=256,
                               decoder_seq_length=256, hidden_dropout=0.1, attention_dropout=0.0)
    assert (mt["moe"]["num_experts"], mt["moe"]["sublayers_per_expert"]) == (32, 3)
    assert (mt["optimizer"]["lr"], mt["optimizer"]["lr_decay_style"], mt["optimizer"]["lr_warmup_iters"],
            mt["optimizer"]["clip_grad"], mt["training"]["label_smoothing"]) == (5e-4, "inverse-square-root", 4000, 0.1, 0.1)
    assert mt["training"]["global_batch_size"] * mt["model"]["encoder_seq_length"] == 512 * 1024  # 512K tokens


# ------------------------------------------------------------------------------------------------
# the loader API
# ------------------------------------------------------------------------------------------------
def test_loader_reads_names_and_paths_like_the_trainer(tmp_path):
    from stablemoe_megatron.cli_args import load_yaml, parse_config
    from stablemoe_megatron.errors import ConfigError
    from stablemoe_megatron.size_configs import load_size, size_config_path, size_flags, size_run_config, size_value

    path = REPO / "configs" / "base.yaml"
    assert size_config_path("base") == path
    assert load_size("base") == load_size(path) == load_size(str(path)) == load_yaml(str(path))
    assert size_value("tiny", "training.train_iters") == 400 and size_value("tiny", "moe.router") == "stablemoe"
    assert size_run_config("large").to_dict() == parse_config(["--config", str(REPO / "configs/large.yaml")]).to_dict()
    # the flags set exactly what the file sets (values and types); without moe: a dense model
    for name in ("tiny", "base", "large"):
        assert _typed(parse_config(size_flags(name)).to_dict()) == _typed(size_run_config(name).to_dict())
        dense = parse_config(size_flags(name, without=("moe",))).to_dict()
        assert dense["moe"] == parse_config([]).to_dict()["moe"] and dense["model"] == size_run_config(name).to_dict()["model"]
    with pytest.raises(ConfigError, match="unknown size 'huge'.*sizes: base, large, mt_base, mt_tiny, tiny"):
        load_size("huge")
    with pytest.raises(ConfigError, match="no such file"):
        load_size(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer: {lr: 1e-3}\n")  # YAML 1.1: a string
    with pytest.raises(ConfigError, match=r"optimizer.lr = '1e-3' is not a float.*1.0e-3"):
        load_size(bad)
    bad.write_text("model: {num_layerz: 2}\n")
    with pytest.raises(ConfigError, match="num_layerz"):
        load_size(bad)


def test_loader_as_a_file_for_the_shell(tmp_path):
    """examples/common.sh runs the file by path (no install, package not importable from the cwd)."""
    script = [sys.executable, str(REPO / "stablemoe_megatron" / "size_configs.py")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = lambda *a: subprocess.run([*script, *a], capture_output=True, text=True, cwd=tmp_path, env=env)  # noqa: E731
    assert run("get", str(REPO / "configs/tiny.yaml"), "moe.num_experts", "moe.sublayers_per_expert",
               "training.train_iters").stdout == "4 2 400\n"
    assert run("list").stdout.split() == ["base", "large", "mt_base", "mt_tiny", "tiny"]
    flags = run("flags", "base", "--without", "moe").stdout.splitlines()
    assert flags[:2] == ["--num-layers", "12"] and "--num-experts" not in flags and "--bf16" in flags
    # the fast path (PyYAML alone) gives what the full reader gives, for every setting of every file
    from stablemoe_megatron.size_configs import load_size, size_value

    for name in ("tiny", "base", "large"):
        keys = [f"{section}.{key}" for section, values in load_size(name).items() for key in values]
        assert run("get", name, *keys).stdout.split() == [str(size_value(name, key)) for key in keys]
    flat = tmp_path / "flat.yaml"
    flat.write_text("num-experts: 6\ntrain_iters: 50\n")  # flat flag names: the full reader, with defaults
    assert run("get", str(flat), "moe.num_experts", "training.train_iters", "moe.sublayers_per_expert").stdout == "6 50 3\n"
    missing = run("get", "huge", "model.num_layers")
    assert missing.returncode == 2 and "unknown size 'huge'" in missing.stderr
    unset = run("get", "tiny", "moe.expert_capacity_factor")
    assert unset.returncode == 2 and "not set" in unset.stderr


def test_recipes_read_the_file_and_the_environment_overrides_it(tmp_path):
    """CONFIG_FILE picks another file; MICRO (now at every size), EXPERTS, TRAIN_ITERS, SEED win over it;
    an unknown SIZE is one message."""
    custom = tmp_path / "custom.yaml"
    custom.write_text((REPO / "configs/tiny.yaml").read_text().replace("train_iters: 400", "train_iters: 1000")
                      .replace("num_experts: 4", "num_experts: 8"))
    got = resolve("examples/pretrain_stablemoe.sh", {"CONFIG_FILE": str(custom)}, [], tmp_path)["config"]
    assert (got["training"]["train_iters"], got["moe"]["num_experts"], got["moe"]["stage2_start_iter"]) == (1000, 8, 100)
    assert got["parallel"]["expert_model_parallel_size"] == 2
    got = resolve("examples/pretrain_switch.sh", {"MICRO": "4", "EXPERTS": "2", "TRAIN_ITERS": "10", "SEED": "3"}, [],
                  tmp_path)["config"]
    assert (got["training"]["micro_batch_size"], got["moe"]["num_experts"], got["training"]["train_iters"],
            got["training"]["seed"]) == (4, 2, 10, 3)
    env = {k: v for k, v in os.environ.items() if k not in RECIPE_VARIABLES}
    done = subprocess.run(["bash", str(REPO / "examples/pretrain_hash.sh")], env=dict(env, SIZE="huge", DRY_RUN="1",
                          RUN_DIR=str(tmp_path / "huge")), capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "SIZE must be one of base large mt_base mt_tiny tiny (got huge" in done.stderr
    assert not (tmp_path / "huge").exists()


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    sys.path.insert(0, str(REPO))
    write_reference()

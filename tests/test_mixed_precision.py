"""Mixed precision on CPU under gloo: --bf16 and --fp16 (megatron's Float16Module, fp32 main weights
and gradients, fp16 loss scaling) train like fp32, skip inf/nan steps as Megatron-LM does, resume
from their checkpoints exactly; the routers compute in fp32; --transformer-impl.

Measured on this machine (megatron-core 0.16.1, torch 2.13 CPU, gloo; tiny StableMoE model across
the stage switch and Switch model, 20 steps at lr 3e-3, fp16 from loss scale 4096 without a skipped
step), the largest per-step relative LM-loss difference |loss - loss_fp32| / loss_fp32 was:

    case                                   bf16       fp16
    StableMoE, 1 process                   9.3e-5     1.6e-5
    StableMoE, DP2 distributed optimizer   1.2e-4     1.4e-5
    Switch, DP2 distributed optimizer      1.2e-4     7.3e-5

``LOSS_RTOL`` allows about 4x the worst of each column.
"""
import json
from pathlib import Path

import pytest
import torch

from data_fixtures import tiny_dataset
from distributed import run_distributed
from trainer_cases import tiny_flags

ITERS = 20
LOSS_RTOL = {"bf16": 5e-4, "fp16": 3e-4}  # per step, relative to fp32 (module docstring)
PRECISIONS = {"fp32": {}, "bf16": {"--bf16": True}, "fp16": {"--fp16": True, "--initial-loss-scale": 4096}}
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("precision_data"))


# -- worker side ------------------------------------------------------------------------------------
def _inf_hook(grad):
    return torch.full_like(grad, float("inf"))


class _ForceInf:
    """Callback: makes one expert weight's gradient inf in the iterations ``at`` (on ``rank`` or all),
    and records whether each of those steps left the weights (model and fp32 main copies) unchanged."""

    def __init__(self, trainer, at, rank):
        self.trainer, self.at, self.handle, self.unchanged = trainer, set(at), None, {}
        here = rank is None or torch.distributed.get_rank() == rank
        experts = [p for p in trainer.model.parameters() if not getattr(p, "allreduce", True)]
        self.param = experts[0] if here else None
        self.before = self._weights()
        self._arm(1)

    def _weights(self):
        main = [p for group in self.trainer.optimizer.param_groups for p in group["params"]]
        return [p.detach().clone() for p in (*self.trainer.model.parameters(), *main)]

    def _arm(self, iteration):
        if iteration in self.at and self.param is not None:
            self.handle = self.param.register_hook(_inf_hook)

    def on_step_end(self, trainer, reporter):
        iteration = trainer.state.iteration
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        now = self._weights()
        if iteration in self.at:
            self.unchanged[iteration] = all(torch.equal(a, b) for a, b in zip(self.before, now))
        self.before = now
        self._arm(iteration + 1)

    def on_train_end(self, trainer, reporter):
        return None

    def summary(self):
        return None


def _precision_facts(trainer) -> dict:
    """dtypes of model weights, fp32 main weights, main grads and Adam state; the loss scalers."""
    from stablemoe_megatron.training.optim import loss_scalers

    distilled = {id(p) for r in trainer.model.distilled_routers() for p in r.distilled.parameters()}
    model = {str(p.dtype) for p in trainer.model.parameters() if id(p) not in distilled}
    main = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    grads = {str(p.main_grad.dtype) for p in trainer.model.parameters() if getattr(p, "main_grad", None) is not None}
    state = {str(v.dtype) for _, s in trainer.optimizer.state.items() for v in s.values()
             if torch.is_tensor(v) and v.dim()}
    scalers = [(type(s).__name__, {k: float(v) for k, v in s.state_dict().items()})
               for s in loss_scalers(trainer.optimizer)]
    buffers = {str(b.dtype) for layer in trainer.model.moe_layers for b in layer.router.buffers()
               if b.is_floating_point()}
    return {"model": model, "distilled": {str(p.dtype) for r in trainer.model.distilled_routers()
                                          for p in r.distilled.parameters()},
            "main": {str(p.dtype) for p in main}, "main_grads": grads, "adam_state": state,
            "scalers": scalers, "router_buffers": buffers}


def train_case(argv, inf_at=(), inf_rank=None):
    """Train through the trainer's loop (no final evaluations); per-iteration records (last rank),
    the precision facts, and which forced-inf steps left the weights unchanged."""
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.training.build import build
    from stablemoe_megatron.training.loop import train_loop
    from stablemoe_megatron.training.reporting import Reporter

    config = parse_config(argv)
    trainer = build(config, "train")
    try:
        forced = _ForceInf(trainer, inf_at, inf_rank) if inf_at else None
        if forced is not None:
            trainer.callbacks.append(forced)
        reporter = Reporter(None, config.logging.metrics_file, config.training.train_iters)
        try:
            train_loop(trainer, reporter)
        finally:
            reporter.close()
        facts = _precision_facts(trainer)
    finally:
        trainer.release()
    last = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1  # the metrics file's writer
    lines = Path(config.logging.metrics_file).read_text().splitlines() if last else []
    records = [json.loads(line) for line in lines]
    facts["records"] = [r for r in records if "lm_loss" in r]
    facts["unchanged"] = forced.unchanged if forced is not None else {}
    return facts


def _run(argv, world, **kwargs):
    results = run_distributed(train_case, world, args=(argv,), kwargs=kwargs)
    facts = results[-1]
    facts["all_unchanged"] = [r["unchanged"] for r in results]
    facts["all_scalers"] = [r["scalers"] for r in results]
    return facts


def _losses(facts):
    return {r["iteration"]: r["lm_loss"] for r in facts["records"]}


# -- training in each precision ---------------------------------------------------------------------
CASES = {  # name -> (processes, flags)
    "stablemoe-1proc": (1, {}),
    "stablemoe-dp2-distributed-optimizer": (2, {"--use-distributed-optimizer": True}),
    "switch-dp2-distributed-optimizer": (2, {"--use-distributed-optimizer": True, "--moe-router": "switch",
                                             "--moe-stage2-start-iter": False}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_half_precision_tracks_fp32(data, tmp_path, case):
    """20 steps in fp32, bf16 and fp16: the same losses within LOSS_RTOL per step; half model weights,
    fp32 main weights / main grads / Adam state; a loss scaler only under fp16 (none skipped here)."""
    world, extra = CASES[case]
    runs = {}
    for name, flags in PRECISIONS.items():
        argv = tiny_flags(data, **{"--train-iters": ITERS, "--metrics-file": tmp_path / f"{name}.jsonl",
                                   **extra, **flags})
        runs[name] = _run(argv, world)
    reference = _losses(runs["fp32"])
    assert sorted(reference) == list(range(1, ITERS + 1))
    assert reference[ITERS] < reference[1] - 0.3  # it learns
    for name in HALF:
        losses = _losses(runs[name])
        worst = max(abs(losses[i] - reference[i]) / reference[i] for i in reference)
        assert worst < LOSS_RTOL[name], (name, worst)
        assert losses != reference  # half precision did run
    fp32 = runs["fp32"]
    assert fp32["model"] == fp32["main"] == {"torch.float32"} and fp32["scalers"] == []
    for name, dtype in HALF.items():
        run = runs[name]
        assert run["model"] == {str(dtype)}, (name, run["model"])
        assert run["main"] == run["main_grads"] == run["adam_state"] == {"torch.float32"}, (name, run)
        assert run["distilled"] <= {"torch.float32"} and run["router_buffers"] <= {"torch.float32"}
        assert all(r["skipped_iterations"] == 0 for r in run["records"])
    assert runs["bf16"]["scalers"] == [] and all(r["loss_scale"] == 1.0 for r in runs["bf16"]["records"])
    kinds = {kind for kind, _ in runs["fp16"]["scalers"]}
    assert kinds == {"DynamicGradScaler"} and len(runs["fp16"]["scalers"]) == 2  # dense + expert optimizers


# -- fp16 loss scaling ----------------------------------------------------------------------------------
def test_fp16_inf_gradient_skips_the_step_and_the_scale_backs_off_and_grows(data, tmp_path):
    """DP2 with the distributed optimizer; an expert weight's gradient made inf on rank 1 only at
    iterations 2 and 3 (hysteresis 2, window 3, initial scale 1024). Megatron's rules: both steps are
    skipped everywhere (weights, fp32 main weights and learning rate unchanged), the first inf only
    spends the hysteresis, the second halves the scale, three clean steps double it. The expert
    optimizer's scaler alone sees the inf; the dense one (which scales the loss) follows it."""
    argv = tiny_flags(data, **{"--train-iters": 10, "--metrics-file": tmp_path / "m.jsonl", "--fp16": True,
                               "--initial-loss-scale": 1024, "--loss-scale-window": 3, "--hysteresis": 2,
                               "--use-distributed-optimizer": True})
    facts = _run(argv, 2, inf_at=(2, 3), inf_rank=1)
    records = {r["iteration"]: r for r in facts["records"]}
    scales = [records[i]["loss_scale"] for i in range(1, 11)]
    assert scales == [1024, 1024, 512, 512, 512, 1024, 1024, 1024, 2048, 2048], scales
    assert [records[i]["skipped_iterations"] for i in range(1, 11)] == [0, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert records[2]["grad_norm"] is None and records[4]["grad_norm"] is not None
    assert records[1]["lr"] == records[2]["lr"] == records[3]["lr"] != records[4]["lr"]
    assert facts["all_unchanged"] == [{2: True, 3: True}] * 2
    for scalers in facts["all_scalers"]:  # dense and expert scalers in lockstep, on both ranks
        assert scalers[0] == scalers[1] == facts["all_scalers"][0][0], facts["all_scalers"]
        assert scalers[0][1] == {"scale": 2048.0, "growth_tracker": 1.0, "hysteresis_tracker": 2.0}


def test_iteration_line_shows_the_loss_scale_and_skipped_iterations():
    from stablemoe_megatron.training.reporting import Reporter

    record = {"iteration": 3, "consumed_samples": 24, "elapsed_ms": 1.0, "lr": 1e-3, "global_batch_size": 8,
              "lm_loss": 6.0, "grad_norm": None, "tokens_per_sec": 1.0, "stage": 1, "loss_scale": 512.0,
              "skipped_iterations": 2}
    line = Reporter(None, None, 10)._line(record, {})
    assert "| loss scale: 512.0 |" in line and "| number of skipped iterations:   2 |" in line


def test_distilled_router_optimizer_unscales_its_gradients():
    """The distillation loss is scaled with the LM loss under --fp16 (MoEAuxLossAutoScaler): its own
    optimizer divides by the step's loss scale, so it updates exactly as without scaling."""
    from stablemoe_megatron.config import RunConfig
    from stablemoe_megatron.training.optim import DistilledRouterOptimizer

    torch.manual_seed(0)
    start, grad = torch.randn(6, 4), torch.randn(6, 4)
    results = []
    for scale in (1.0, 1024.0):
        param = torch.nn.Parameter(start.clone())
        optimizer = DistilledRouterOptimizer([param], RunConfig())
        param.grad = grad * scale
        norm = optimizer.step(1e-2, grad_scale=scale)
        results.append((param.detach().clone(), norm))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]
    assert not torch.equal(results[0][0], start)


# -- checkpoints -----------------------------------------------------------------------------------
RESUME_CASES = {  # name -> (processes, flags): fp16 starts high so the first steps overflow and skip
    "fp16-1proc": (1, {"--fp16": True, "--initial-loss-scale": 2 ** 22, "--loss-scale-window": 3}),
    "bf16-dp2-distributed-optimizer": (2, {"--bf16": True, "--use-distributed-optimizer": True}),
}


def _common_state(ckpt: Path, iteration: int) -> dict:
    return torch.load(ckpt / f"iter_{iteration:07d}" / "common.pt", weights_only=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RESUME_CASES))
def test_half_precision_checkpoint_resumes_exactly(data, tmp_path, name):
    """Stopped at iteration 4 and resumed: the uninterrupted run's losses bitwise and its loss
    scales (fp32 main weights and the loss scaler's state are in the checkpoint)."""
    world, extra = RESUME_CASES[name]

    def flags(run_dir, label, **more):
        return tiny_flags(data, **{"--train-iters": 8, "--save": run_dir / "ckpt", "--load": run_dir / "ckpt",
                                   "--save-interval": 4, "--metrics-file": run_dir / f"{label}.jsonl",
                                   **extra, **more})
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    for d in (full_dir, part_dir):
        (d / "ckpt").mkdir(parents=True)
    full = _run(flags(full_dir, "full"), world)
    _run(flags(part_dir, "first", **{"--exit-interval": 4}), world)
    resumed = _run(flags(part_dir, "second"), world)
    reference = {r["iteration"]: (r["lm_loss"], r["loss_scale"]) for r in full["records"]}
    again = {r["iteration"]: (r["lm_loss"], r["loss_scale"]) for r in resumed["records"]}
    assert sorted(again) == [5, 6, 7, 8]
    assert all(again[i] == reference[i] for i in again), (again, reference)
    common = _common_state(part_dir / "ckpt", 4)["optimizer"]
    parts = common.values() if 0 in common else [common]  # ChainedOptimizer: {0: dense, 1: expert}
    scalers = [part.get("grad_scaler") for part in parts]
    if "--fp16" in extra:
        skipped = sum(r["skipped_iterations"] for r in full["records"] if r["iteration"] <= 4)
        assert skipped >= 1  # the scaler's state at the checkpoint is not the initial one
        assert all(float(s["scale"]) == reference[4][1] for s in scalers), (scalers, reference[4])
    else:
        assert scalers == [None, None]


# -- routers in half precision -------------------------------------------------------------------------
def router_dtypes(router, dtype_name):
    """A tiny GPT with ``router`` under half_precision, one training and one evaluation forward:
    the dtypes of each MoE layer's scores, gates, auxiliary loss and metrics."""
    from moe_cases import batch, build, positions

    from stablemoe_megatron.config import RunConfig
    from stablemoe_megatron.routing import get_routing
    from stablemoe_megatron.training.optim import half_precision

    distill = "wordemb" if get_routing(router).distillable else None
    model = build(router=router, distill=distill, **{dtype_name: True})
    run = RunConfig()
    setattr(run.training, dtype_name, True)
    wrapped = half_precision(model, model.config, run)
    tokens, labels = batch(0)
    seen = {}
    for mode in ("train", "eval"):
        wrapped.train(mode == "train")
        for layer in model.moe_layers:
            layer.keep_last_decision = True
        output = wrapped(tokens, positions(), None, labels=labels)
        for index, layer in enumerate(model.moe_layers):
            decision = layer.last_decision
            hidden = torch.randn(8, model.config.hidden_size).to(HALF[dtype_name])
            scores = layer.router.scores(hidden).dtype if hasattr(layer.router, "scores") else None
            seen[f"{mode}{index}"] = {
                "gates": str(decision.gates.dtype), "aux_loss": str(decision.aux_loss.dtype),
                "metrics": sorted({str(v.dtype) for v in decision.metrics.values() if torch.is_tensor(v)}),
                "metric_names": sorted(decision.metrics), "scores": str(scores),
                "weight": str(layer.router.weight.dtype) if hasattr(layer.router, "weight") else None,
                "fp32_state": sorted({str(t.dtype) for t in (*layer.router.buffers(), *(
                    layer.router.distilled.parameters() if getattr(layer.router, "distilled", None) else ()))
                    if t.is_floating_point()}),
            }
        seen[f"{mode}_output"] = str(output.dtype)
    return seen


HALF_NAMES = {"bf16": "bfloat16", "fp16": "float16"}


@pytest.mark.parametrize("dtype_name", sorted(HALF_NAMES))
def test_routers_compute_in_fp32_from_half_inputs(dtype_name):
    from stablemoe_megatron.routing import routing_names

    for router in routing_names():
        seen = run_distributed(router_dtypes, 1, args=(router, dtype_name))[0]
        for key, facts in seen.items():
            if key.endswith("_output"):
                assert facts == "torch.float32", (router, key, facts)  # Float16Module: fp32 out
                continue
            assert facts["gates"] == facts["aux_loss"] == "torch.float32", (router, key, facts)
            assert facts["metrics"] == ["torch.float32"], (router, key, facts)
            assert facts["scores"] in ("torch.float32", "None"), (router, key, facts)
            assert facts["weight"] in (f"torch.{HALF_NAMES[dtype_name]}", None)  # half, fp32 main copy
            assert facts["fp32_state"] in ([], ["torch.float32"]), (router, key, facts)  # thresholds, distilled
        if router == "stablemoe":
            assert "balance_loss" in seen["train0"]["metric_names"] and "distill_loss" in seen["train0"]["metric_names"]
        if router == "switch":
            assert "aux_loss" in seen["train0"]["metric_names"]
        if router in ("stablemoe", "expert-choice"):  # distilled router / evaluation thresholds kept fp32
            assert seen["train0"]["fp32_state"] == ["torch.float32"], (router, seen["train0"])


# -- settings ---------------------------------------------------------------------------------------
def test_precision_flags_follow_megatron():
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.config import check_ranges
    from stablemoe_megatron.errors import ConfigError

    training = parse_config([]).training
    assert (training.fp16, training.bf16, training.loss_scale, training.initial_loss_scale,
            training.min_loss_scale, training.loss_scale_window, training.hysteresis) == \
        (False, False, None, 2.0 ** 32, 1.0, 1000, 2)
    parsed = parse_config(["--fp16", "--loss-scale", "128", "--loss-scale-window", "50", "--hysteresis", "3"]).training
    assert (parsed.fp16, parsed.loss_scale, parsed.loss_scale_window, parsed.hysteresis) == (True, 128.0, 50.0, 3)
    for flags, message in (
        (["--fp16", "--bf16"], "--fp16 and --bf16 both set: choose one precision"),
        (["--fp16", "--min-loss-scale", "8", "--initial-loss-scale", "4"],
         "--min-loss-scale 8 is above --initial-loss-scale 4"),
        (["--fp16", "--loss-scale-window", "2.5"],
         "--loss-scale-window must be a whole number of iterations, got 2.5 (the scale would never grow)"),
    ):
        with pytest.raises(ConfigError) as err:
            parse_config(flags).training.validate_precision()
        assert str(err.value) == message
    with pytest.raises(ConfigError, match="^--hysteresis must be >= 1, got 0$"):
        check_ranges(parse_config(["--hysteresis", "0"]))


def test_transformer_impl(monkeypatch):
    """Unset: transformer-engine when usable, else local; local forces local; transformer_engine
    without transformer-engine or CUDA is one ConfigError saying what is missing."""
    from stablemoe_megatron.cli_args import parse_config
    from stablemoe_megatron.errors import ConfigError
    from stablemoe_megatron.model import config as model_config, specs
    from stablemoe_megatron.model.gpt import transformer_config
    from stablemoe_megatron.moe.config import MoEConfig

    assert parse_config([]).model.transformer_impl is None
    assert parse_config(["--transformer-impl", "local"]).model.transformer_impl == "local"
    model = model_config.ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                                     transformer_impl="transformer_engine")
    missing = model_config.transformer_engine_missing()
    if missing is not None:  # this machine (no transformer-engine, no CUDA)
        assert "CUDA is not available" in missing or "transformer-engine does not import" in missing
        expected = (f"--transformer-impl transformer_engine cannot run here: {missing}. Use --transformer-impl "
                    f"local (or leave it unset to choose automatically)")
        with pytest.raises(ConfigError) as err:
            model.validate()
        assert str(err.value) == expected
        with pytest.raises(ConfigError, match="^--transformer-impl transformer_engine cannot run here: "):
            specs.use_transformer_engine("transformer_engine")
    monkeypatch.setattr(specs, "HAVE_TE", True)  # as on a machine with transformer-engine and CUDA
    assert specs.use_transformer_engine(None) is True and specs.use_transformer_engine("local") is False
    model.transformer_impl = "local"
    tconfig = transformer_config(model, MoEConfig())
    assert not (tconfig.gradient_accumulation_fusion or tconfig.masked_softmax_fusion or tconfig.apply_rope_fusion)
    layer = specs.decoder_layer_specs(tconfig, MoEConfig(), 128, use_te=specs.use_transformer_engine("local"))[0]
    modules = [layer.submodules.self_attention.submodules.linear_qkv, layer.submodules.mlp.submodules.linear_fc1]
    assert all("transformer_engine" not in m.__module__ for m in modules), modules
    monkeypatch.setattr(specs, "HAVE_TE", False)
    assert specs.use_transformer_engine(None) is False

"""``build(config, mode)``: one way to a ready :class:`~.trainer.Trainer` for training, evaluation, benchmarks.

* ``"train"``: :func:`~.preflight.preflight` (every check, before any work), then rank 0 claims
  ``--save`` (lock, run_config.yaml), then process groups and seeds, the model, megatron DDP and
  optimizer (+ the distilled routers' own optimizer), resume, the data, and the callbacks (the
  routing probe).
* ``"evaluate"``: the checks (``--load`` is the caller's), groups, the model alone (no DDP, no
  optimizer); the caller loads the checkpoint into ``trainer.ddp_model``.
* ``"bench"``: the model and optimizers for ``vocab_size`` token ids, on process groups the caller
  initialised; no data, no checks of files.
"""
from __future__ import annotations

from typing import Optional

import torch

from stablemoe_megatron import data as data_lib
from stablemoe_megatron.config import RunConfig
from stablemoe_megatron.model.config import is_encoder_decoder
from stablemoe_megatron.runtime import is_first_rank, world_size_from_env
from stablemoe_megatron.training.preflight import preflight
from stablemoe_megatron.training.stage import StageSchedule
from stablemoe_megatron.training.trainer import Trainer

MODES = ("train", "evaluate", "bench")


def layout_of(config: RunConfig) -> dict:
    """The parallel layout recorded in checkpoints (RNG states reload only under the same tp/pp/ep/dp)."""
    from megatron.core import parallel_state as ps

    p = config.parallel
    return {"tp": p.tensor_model_parallel_size, "pp": p.pipeline_model_parallel_size,
            "ep": p.expert_model_parallel_size, "dp": ps.get_data_parallel_world_size(),
            "distributed_optimizer": p.use_distributed_optimizer}


def initialize(config: RunConfig) -> None:
    """megatron's process groups for the configured layout, then the seeds."""
    from stablemoe_megatron.parallel import ParallelSizes, initialize_distributed, seed_everything

    p = config.parallel
    initialize_distributed(ParallelSizes(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                         p.expert_model_parallel_size, p.expert_tensor_parallel_size or 1))
    seed_everything(config.training.seed)


def build_model(config: RunConfig, vocab_size: int):
    """(this rank's model, its megatron TransformerConfig); groups must exist."""
    from stablemoe_megatron.model.gpt import build_model as build_gpt, transformer_config_for
    from stablemoe_megatron.parallel import host_expert_parallel_group

    tconfig = transformer_config_for(config)
    if is_encoder_decoder(config):
        from stablemoe_megatron.model.encdec import build_model as build_encoder_decoder

        model = build_encoder_decoder(config, vocab_size, tconfig, host_ep_group=host_expert_parallel_group())
    else:
        model = build_gpt(config.model, config.moe, vocab_size, tconfig, host_ep_group=host_expert_parallel_group())
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if config.moe.enabled and config.moe.hash_table == "frequency" and _table_from_data(config):
        _install_frequency_hash_table(config, model, vocab_size)
    return model, tconfig


def _table_from_data(config: RunConfig) -> bool:
    """Whether the router's fixed table is built from the training data's token counts."""
    from stablemoe_megatron.routing import get_routing

    return get_routing(config.moe.router).table_from_training_data


def build_optimizers(config: RunConfig, model, tconfig, world_size: int):
    """(ddp_model, optimizer, scheduler, side_optimizer): megatron DDP + optimizer around ``model``;
    the distilled routers stay outside both, with their own optimizer."""
    from megatron.core import parallel_state as ps

    from stablemoe_megatron.training.optim import (
        DistilledRouterOptimizer, build_optimizer, distilled_parameters, hidden_from_megatron, wrap_model)

    params = distilled_parameters(model)
    with hidden_from_megatron(params):  # trained by their own optimizer in stage 1, then frozen
        ddp_model = wrap_model(model, tconfig, config)
        optimizer, scheduler = build_optimizer(config, ddp_model, config.global_batch(world_size))
    tconfig.finalize_model_grads_func = _finalize_model_grads
    tconfig.no_sync_func = ddp_model.no_sync
    side = None
    if params:
        side = DistilledRouterOptimizer(params, config, ps.get_data_parallel_group(with_context_parallel=True))
    return ddp_model, optimizer, scheduler, side


def _finalize_model_grads(*args, **kwargs):
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(*args, **kwargs)


def _install_frequency_hash_table(config: RunConfig, model, vocab_size: int) -> None:
    """Hash layer's balanced table from the training data's token frequencies (Roller et al.)."""
    from stablemoe_megatron.routing import frequency_balanced_hash_table

    counts = data_lib.token_counts(config.data, vocab_size)
    table = frequency_balanced_hash_table(counts, config.moe.num_experts, config.moe.hash_seed)
    for layer in model.moe_layers:
        layer.router.set_table(table.to(layer.router.table.device))


def _evaluation_wrapper(config: RunConfig, model, tconfig):
    """The model as evaluation runs it: in bf16/fp16 when configured, as in training (no DDP, no optimizer)."""
    from stablemoe_megatron.training.optim import half_precision

    return half_precision(model, tconfig, config)


def build(config: RunConfig, mode: str = "train", vocab_size: Optional[int] = None) -> Trainer:
    """A ready :class:`Trainer` for ``mode`` (see the module docstring); call ``trainer.release()`` at the end."""
    from megatron.core import parallel_state as ps

    from stablemoe_megatron.checkpoint import TrainState
    from stablemoe_megatron.cli_args import dump_config
    from stablemoe_megatron.training.save_dir import claim

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    world = world_size_from_env() if mode != "bench" else torch.distributed.get_world_size()
    checked = preflight(config, world, resume=mode == "train") if mode != "bench" else None
    vocab = checked.vocab_size if checked is not None else vocab_size
    lock = claim(config, dump_config(config), is_first_rank()) if mode == "train" else None
    try:
        if mode != "bench":
            initialize(config)
        model, tconfig = build_model(config, vocab)
        trainer = Trainer(config, model, model, TrainState(), checked.tokenizer if checked else None,
                          config.num_microbatches(world), config.global_batch(world),
                          StageSchedule(config.moe.stage2_start_iter),
                          dp_group=ps.get_data_parallel_group(with_context_parallel=True), save_lock=lock)
        if mode == "evaluate":
            trainer.ddp_model = _evaluation_wrapper(config, model, tconfig)
            return trainer
        trainer.ddp_model, trainer.optimizer, trainer.scheduler, trainer.side_optimizer = \
            build_optimizers(config, model, tconfig, world)
        if mode == "train":
            _prepare_training(trainer, checked, world)
        return trainer
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _prepare_training(trainer: Trainer, checked, world_size: int) -> None:
    """Resume (weights, optimizer, position, stage) or start from another checkpoint's weights,
    attach the data and the callbacks."""
    from stablemoe_megatron.training.pretrained import load_pretrained, rng_kept

    config = trainer.config
    trainer.state.layout = layout_of(config)
    trainer.state.tokenizer_vocab_size = trainer.tokenizer.vocab_size
    if checked.load_dir is not None:
        with rng_kept(config.checkpoint.no_load_rng):
            _resume(trainer, checked.load_dir)
    elif checked.weights is not None:
        load_pretrained(trainer, checked.weights)  # --pretrained-checkpoint / --finetune: iteration 0
    _attach_data(trainer, world_size)
    if config.logging.routing_probe_interval and config.moe.enabled:
        from stablemoe_megatron.training.probe import RoutingProbe

        trainer.callbacks.append(RoutingProbe.for_trainer(trainer))


def _resume(trainer: Trainer, load_dir) -> None:
    from stablemoe_megatron.training.checkpointing import load_checkpoint

    config, state = trainer.config, trainer.state
    loaded = load_checkpoint(load_dir, trainer.ddp_model, trainer.optimizer, trainer.scheduler,
                             trainer.side_optimizer, layout=state.layout,
                             load_optim=not config.checkpoint.no_load_optim, seed=config.training.seed)
    state.iteration = loaded.iteration
    state.tokenizer_vocab_size = loaded.tokenizer_vocab_size or state.tokenizer_vocab_size
    state.consumed_train_samples = loaded.consumed_train_samples
    if trainer.stage.due(loaded.iteration) or loaded.stage == 2:
        trainer.enter_stage_two()  # after the weights are loaded: the frozen routing tables come from them


def _attach_data(trainer: Trainer, world_size: int) -> None:
    from megatron.core import parallel_state as ps

    config = trainer.config
    if is_encoder_decoder(config):
        from stablemoe_megatron import parallel_text as source

        batch = config.global_batch(world_size)
        train, valid, test = source.build_datasets(config, trainer.tokenizer.eod, config.training.train_iters * batch,
                                                   batch)
    else:
        source = data_lib
        train, valid, test = data_lib.build_datasets(config, trainer.tokenizer, world_size)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    micro, workers = config.training.micro_batch_size, config.data.num_workers
    trainer.train_iterator = lambda: source.micro_batches(
        train, trainer.state.consumed_train_samples, micro, dp_rank, dp_size, workers)
    if valid is not None:
        trainer.valid_iterator = lambda: source.micro_batches(valid, 0, micro, dp_rank, dp_size, workers)
    if test is not None:
        trainer.test_iterator = lambda: source.micro_batches(test, 0, micro, dp_rank, dp_size, workers)

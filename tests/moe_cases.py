"""Tiny StableMoE GPT set-ups run inside the multi-rank test workers (importable by name)."""
import torch

VOCAB, SEQ, BATCH, EXPERTS = 128, 16, 4, 4


def build(router="stablemoe", layout="paper", positions="middle", sublayers=2, num_layers=4,
          distill=None, capacity=None, moe_options=None, model_options=None, **parallel):
    """A tiny GPT with MoE layers; ``moe_options`` / ``model_options`` are further MoEConfig / ModelConfig fields."""
    from megatron.core import parallel_state as ps

    from stablemoe_megatron.model.config import ModelConfig
    from stablemoe_megatron.model.gpt import build_model, transformer_config
    from stablemoe_megatron.moe.config import MoEConfig

    model_cfg = ModelConfig(num_layers=num_layers, hidden_size=32, num_attention_heads=4,
                            seq_length=SEQ, untie_embeddings_and_output_weights=True,
                            **{"hidden_dropout": 0.0, "attention_dropout": 0.0, "add_bias_linear": False,
                               **(model_options or {})})
    moe = MoEConfig(num_experts=EXPERTS, router=router, layer_positions=positions,
                    layer_freq=2 if layout == "megatron" else None, sublayers_per_expert=sublayers,
                    distill_router=distill, expert_capacity_factor=capacity, **(moe_options or {}))
    config = transformer_config(
        model_cfg, moe, tensor_parallel=ps.get_tensor_model_parallel_world_size(),
        pipeline_parallel=ps.get_pipeline_model_parallel_world_size(),
        expert_parallel=ps.get_expert_model_parallel_world_size(),
        sequence_parallel=ps.get_tensor_model_parallel_world_size() > 1, **parallel)
    return build_model(model_cfg, moe, VOCAB, config)


def batch(seed=0, batch_size=BATCH):
    gen = torch.Generator().manual_seed(1000 + seed)
    tokens = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def positions(batch_size=BATCH):
    return torch.arange(SEQ).unsqueeze(0).expand(batch_size, SEQ)


def forward_backward(model, seed):
    tokens, labels = batch(seed)
    losses = model(tokens, positions(), None, labels=labels)
    losses.mean().backward()
    return losses.detach()


def forward_backward_together(model, num_batches):
    """The batches 0 .. num_batches-1 of as many data-parallel ranks as ONE micro-batch, with the
    gradient those ranks' reductions sum to (:func:`reduce_grads_like_megatron`, no averaging):
    the sum of the per-batch mean LM losses, and the auxiliary losses scaled by the number of
    ranks (with ``--moe-balance-count-scope data-parallel``, the default, each rank's balance loss
    is that number times its share of the loss over every rank's tokens). The reference for
    routing that counts over the data-parallel ranks (and is indifferent to the token shuffle).

    Returns the per-token losses [BATCH, SEQ] of each batch.
    """
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    pairs = [batch(seed) for seed in range(num_batches)]
    tokens, labels = torch.cat([t for t, _ in pairs]), torch.cat([lab for _, lab in pairs])
    MoEAuxLossAutoScaler.main_loss_backward_scale = torch.tensor(float(num_batches))
    try:
        losses = model(tokens, positions(tokens.shape[0]), None, labels=labels)
        (losses.mean() * num_batches).backward()
    finally:
        MoEAuxLossAutoScaler.main_loss_backward_scale = None  # the default, 1.0
    return list(losses.detach().split(BATCH))


def reduce_grads_like_megatron(model):
    """Sum grads the way megatron's DDP + finalize_model_grads combine them (without averaging).

    Expert parameters (allreduce=False): over the expert-data-parallel group. Others: over the TP
    group if they are replicated but see different tokens (sequence_parallel), then over DP.
    """
    from megatron.core import parallel_state as ps

    for param in model.parameters():
        if param.grad is None:
            continue
        if not getattr(param, "allreduce", True):
            torch.distributed.all_reduce(param.grad, group=ps.get_expert_data_parallel_group())
            continue
        if getattr(param, "sequence_parallel", False):
            torch.distributed.all_reduce(param.grad, group=ps.get_tensor_model_parallel_group())
        torch.distributed.all_reduce(param.grad, group=ps.get_data_parallel_group())

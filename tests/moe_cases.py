"""Tiny StableMoE GPT set-ups run inside the multi-rank test workers (importable by name)."""
import torch

VOCAB, SEQ, BATCH, EXPERTS = 128, 16, 4, 4


def build(router="stablemoe", layout="paper", positions="middle", sublayers=2, num_layers=4,
          distill=None, capacity=None, moe_options=None, **parallel):
    """A tiny GPT with MoE layers; ``moe_options`` are further MoEConfig fields."""
    from megatron.core import parallel_state as ps

    from stablemoe_megatron.model.config import ModelConfig
    from stablemoe_megatron.model.gpt import build_model, transformer_config
    from stablemoe_megatron.moe.config import MoEConfig

    model_cfg = ModelConfig(num_layers=num_layers, hidden_size=32, num_attention_heads=4,
                            seq_length=SEQ, untie_embeddings_and_output_weights=True)
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

"""Plain megatron-core GPT (local spec) set-ups run inside the multi-rank test workers.

Module-level functions so the worker processes can import them by name.
"""
import torch

VOCAB, SEQ, BATCH = 128, 16, 4


def tiny_config(**overrides):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        gradient_accumulation_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        apply_rope_fusion=False, pipeline_dtype=torch.float32, batch_p2p_comm=False,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt(config):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel

    return GPTModel(
        config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
    )


def batch(seed=0, batch_size=BATCH):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def positions(batch_size=BATCH):
    return torch.arange(SEQ).unsqueeze(0).expand(batch_size, SEQ)

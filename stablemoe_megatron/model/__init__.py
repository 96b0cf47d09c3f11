"""GPT model with StableMoE layers on megatron-core (imports megatron-core)."""

"""Model-shape settings (part of the run's config tree). No megatron imports here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from stablemoe_megatron.errors import ConfigError

POSITION_EMBEDDINGS = ("learned_absolute", "rope")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ACTIVATIONS = ("gelu", "relu")


@dataclass
class ModelConfig:
    """GPT shape. Defaults are the paper's base setting (Table 7), with its 50,257-token vocab."""

    num_layers: int = field(default=12, metadata={"range": "[1, inf)", "help": "transformer layers"})
    hidden_size: int = field(default=768, metadata={"range": "[1, inf)", "help": "model width d"})
    ffn_hidden_size: Optional[int] = field(default=None, metadata={"range": "[1, inf)", "help": "FFN inner size (default 4 * hidden)"})
    num_attention_heads: int = field(default=12, metadata={"range": "[1, inf)", "help": "attention heads"})
    seq_length: int = field(default=1024, metadata={"range": "[1, inf)", "help": "tokens per training sample"})
    max_position_embeddings: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "learned position embeddings (default --seq-length)"})
    position_embedding_type: str = field(default="learned_absolute", metadata={
        "help": "position embedding", "choices": POSITION_EMBEDDINGS})
    normalization: str = field(default="LayerNorm", metadata={"help": "norm", "choices": NORMALIZATIONS})
    activation: str = field(default="gelu", metadata={"choices": ACTIVATIONS, "help":
        "FFN activation of the backbone MLPs and of every expert FFN sublayer (gelu: megatron's exact "
        "GeLU; relu matches the authors' StableMoE code)"})
    hidden_dropout: float = field(default=0.0, metadata={"range": "[0, 1)", "help": "dropout after attention/FFN (paper: 0)"})
    attention_dropout: float = field(default=0.0, metadata={"range": "[0, 1)", "help": "attention dropout (paper: 0)"})
    init_method_std: float = field(default=0.02, metadata={"range": "(0, inf)", "help": "std of normal weight initialisation"})
    untie_embeddings_and_output_weights: bool = field(default=False, metadata={
        "help": "separate input embedding and output layer weights"})
    make_vocab_size_divisible_by: int = field(default=128, metadata={"range": "[1, inf)",
        "help": "pad the vocabulary to a multiple of this (times TP size)"})

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    def validate(self, tensor_parallel: int = 1) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"--activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"--hidden-size {self.hidden_size} is not divisible by "
                              f"--num-attention-heads {self.num_attention_heads}")
        if self.num_attention_heads % tensor_parallel:
            raise ConfigError(f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                              f"--tensor-model-parallel-size {tensor_parallel}")
        if self.max_positions < self.seq_length:
            raise ConfigError(f"--max-position-embeddings {self.max_positions} < --seq-length {self.seq_length}")

    def padded_vocab_size(self, vocab_size: int, tensor_parallel: int = 1) -> int:
        """Megatron's padding: round the tokenizer's vocabulary up to a multiple of divisor x TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return ((vocab_size + multiple - 1) // multiple) * multiple

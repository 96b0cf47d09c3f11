"""Model-shape settings (part of the run's config tree). No megatron imports here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from stablemoe_megatron.errors import ConfigError

POSITION_EMBEDDINGS = ("learned_absolute", "rope")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ACTIVATIONS = ("gelu", "relu")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
MODEL_FAMILIES = ("gpt", "encoder_decoder")

RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
# megatron-core's recompute_modules names (TransformerConfig); the last three are refused here
RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp", "moe", "moe_act", "mla_up_proj", "shared_experts")


def is_encoder_decoder(run) -> bool:
    """Whether a RunConfig's model is the encoder-decoder (translation) family."""
    return run.model.model_family == "encoder_decoder"


def transformer_engine_missing() -> Optional[str]:
    """What ``--transformer-impl transformer_engine`` lacks on this machine ("; "-joined), or None.

    transformer-engine must import and CUDA must be present (its modules are GPU kernels): the same
    test as ``model.specs.HAVE_TE``, which the default (unset: automatic) follows. Imports torch
    (and tries transformer-engine) only when called.
    """
    import torch

    missing = []
    try:
        import transformer_engine  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
        missing.append(f"transformer-engine does not import ({type(exc).__name__}: {exc}); install the "
                       f"[te] extra on a CUDA machine")
    if not torch.cuda.is_available():
        missing.append("CUDA is not available (torch.cuda.is_available() is False)")
    return "; ".join(missing) or None


@dataclass
class ModelConfig:
    """GPT shape. As in Megatron-LM, the size flags are required (configs/*.yaml set them) and the
    defaults are Megatron-LM's (dropout 0.1, linear biases on, GeLU); the paper's values live in the
    size configs."""

    num_layers: Optional[int] = field(default=None, metadata={"range": "[1, inf)", "help": "transformer layers (required)"})
    hidden_size: Optional[int] = field(default=None, metadata={"range": "[1, inf)", "help": "model width d (required)"})
    ffn_hidden_size: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "FFN inner size (default 4 * hidden; with --swiglu int(8 * hidden / 3 / 64) * 64, as Megatron-LM)"})
    num_attention_heads: Optional[int] = field(default=None, metadata={"range": "[1, inf)", "help": "attention heads (required)"})
    seq_length: Optional[int] = field(default=None, metadata={"range": "[1, inf)", "help": "tokens per training sample (required)"})
    max_position_embeddings: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "learned position embeddings (default --seq-length)"})
    model_family: str = field(default="gpt", metadata={"choices": MODEL_FAMILIES, "help":
        "gpt (decoder-only language model) or encoder_decoder (translation: megatron-core's T5Model with "
        "an MoE layer in each stack, trained on parallel text; docs/TRANSLATION.md)"})
    encoder_num_layers: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "encoder layers of --model-family encoder_decoder (default --num-layers)"})
    decoder_num_layers: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "decoder layers of --model-family encoder_decoder (default --num-layers)"})
    encoder_seq_length: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "longest source in tokens, language tag and end-of-sentence included (encoder_decoder; "
                "default --seq-length; longer sources are truncated)"})
    decoder_seq_length: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "longest target in tokens, end-of-sentence included (encoder_decoder; default --seq-length; "
                "longer targets are truncated)"})
    position_embedding_type: str = field(default="learned_absolute", metadata={
        "help": "position embedding", "choices": POSITION_EMBEDDINGS})
    normalization: str = field(default="LayerNorm", metadata={"help": "norm", "choices": NORMALIZATIONS})
    activation: str = field(default="gelu", metadata={"choices": ACTIVATIONS, "help":
        "FFN activation of the backbone MLPs and of every expert FFN sublayer (gelu: megatron's exact "
        "GeLU; relu matches the authors' StableMoE code)"})
    hidden_dropout: float = field(default=0.1, metadata={"range": "[0, 1)", "help": "dropout after attention/FFN (paper: 0)"})
    attention_dropout: float = field(default=0.1, metadata={"range": "[0, 1)", "help": "attention dropout (paper: 0)"})
    swiglu: bool = field(default=False, metadata={
        "help": "SwiGLU FFNs (backbone MLPs and every expert): SiLU-gated fc1 of twice the width, as Megatron-LM"})
    add_bias_linear: bool = field(default=True, metadata={"off_flag": "--disable-bias-linear",
        "help": "biases in the linear layers (attention, MLPs, expert FFNs; routers stay bias-free); "
                "--disable-bias-linear removes them"})
    init_method_std: float = field(default=0.02, metadata={"range": "(0, inf)", "help": "std of normal weight initialisation"})
    untie_embeddings_and_output_weights: bool = field(default=False, metadata={
        "help": "separate input embedding and output layer weights"})
    make_vocab_size_divisible_by: int = field(default=128, metadata={"range": "[1, inf)",
        "help": "pad the vocabulary to a multiple of this (times TP size)"})
    transformer_impl: Optional[str] = field(default=None, metadata={"choices": TRANSFORMER_IMPLS, "help":
        "layer modules: transformer_engine (fused GPU kernels) or local (plain torch); unset: "
        "transformer_engine when it imports and CUDA is present, else local (Megatron-LM's default is "
        "transformer_engine)"})
    # -- activation recomputation (Megatron-LM's flags; docs/ARCHITECTURE.md, "Activation recomputation")
    recompute_activations: bool = field(default=False, metadata={"help":
        "recompute activations in backward instead of keeping them (Megatron-LM's shorthand for "
        "--recompute-granularity selective)"})
    recompute_granularity: Optional[str] = field(default=None, metadata={"choices": RECOMPUTE_GRANULARITIES,
        "help": "activation recomputation: full (whole transformer layers, their MoE layers included, are "
                "re-run in backward; needs --recompute-method and --recompute-num-layers) or selective "
                "(the --recompute-modules parts of every layer)"})
    recompute_method: Optional[str] = field(default=None, metadata={"choices": RECOMPUTE_METHODS,
        "help": "which layers full recomputation re-runs: uniform (all, in chunks of --recompute-num-layers "
                "layers) or block (the first --recompute-num-layers layers of each pipeline stage)"})
    recompute_num_layers: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "layers per recomputed chunk (uniform) or recomputed layers per pipeline stage (block)"})
    recompute_modules: List[str] = field(default_factory=list, metadata={"choices": RECOMPUTE_MODULES,
        "help": "what selective recomputation re-runs (default: core_attn): core_attn (attention scores), "
                "layernorm, mlp (dense MLPs and the MoE layers of --moe-layer-freq, which megatron "
                "runs as MLPs), moe (every MoE layer, both layouts)"})

    @property
    def ffn_size(self) -> int:
        """--ffn-hidden-size, or Megatron-LM's default: 4h, with --swiglu int(4h * 2/3 / 64) * 64."""
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        return int(4 * self.hidden_size * 2 / 3 / 64) * 64 if self.swiglu else 4 * self.hidden_size

    @property
    def max_positions(self) -> int:
        longest = max(self.seq_length or 0, self.source_length or 0, self.target_length or 0)
        return self.max_position_embeddings or longest

    @property
    def tokens_per_sample(self) -> int:
        """Tokens a sample feeds the model (source + target for encoder_decoder)."""
        if self.model_family == "encoder_decoder":
            return self.source_length + self.target_length
        return self.seq_length

    @property
    def encoder_layers(self) -> int:
        return self.encoder_num_layers or self.num_layers

    @property
    def decoder_layers(self) -> int:
        return self.decoder_num_layers or self.num_layers

    @property
    def source_length(self) -> Optional[int]:
        """Padded source length of a translation sample (--encoder-seq-length, default --seq-length)."""
        return self.encoder_seq_length or self.seq_length

    @property
    def target_length(self) -> Optional[int]:
        """Padded target length of a translation sample (--decoder-seq-length, default --seq-length)."""
        return self.decoder_seq_length or self.seq_length

    def validate_family(self, pipeline_parallel: int) -> None:
        """The encoder-decoder family's rules (no-op for gpt)."""
        if self.model_family not in MODEL_FAMILIES:
            raise ConfigError(f"--model-family must be one of {', '.join(MODEL_FAMILIES)}, got {self.model_family!r}")
        if self.model_family == "gpt":
            for name in ("encoder_num_layers", "decoder_num_layers", "encoder_seq_length", "decoder_seq_length"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"--{name.replace('_', '-')} is for --model-family encoder_decoder: drop it")
            return
        if pipeline_parallel > 1:
            raise ConfigError("--model-family encoder_decoder with --pipeline-model-parallel-size > 1 is not "
                              "supported: megatron-core 0.16's pipeline schedules pass one activation between "
                              "stages, an encoder-decoder stage needs two (decoder state and encoder output); "
                              "use tensor, expert and data parallelism (--pipeline-model-parallel-size 1)")

    def validate(self, tensor_parallel: int = 1) -> None:
        if self.seq_length is None and self.model_family == "encoder_decoder" and self.encoder_seq_length:
            self.seq_length = self.encoder_seq_length  # Megatron-LM: --seq-length is the encoder's
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
            if getattr(self, name) is None:
                raise ConfigError(f"--{name.replace('_', '-')} is required (as in Megatron-LM): give it, or "
                                  f"a size file with --config configs/tiny.yaml (base, large)")
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"--activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.swiglu and self.activation != "gelu":
            raise ConfigError(f"--swiglu sets the FFN activation (SiLU-gated); drop --activation {self.activation}")
        if self.swiglu and self.ffn_size < 1:
            raise ConfigError(f"--swiglu's default FFN size int(8 * {self.hidden_size} / 3 / 64) * 64 is 0: "
                              f"give --ffn-hidden-size")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"--hidden-size {self.hidden_size} is not divisible by "
                              f"--num-attention-heads {self.num_attention_heads}")
        if self.num_attention_heads % tensor_parallel:
            raise ConfigError(f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                              f"--tensor-model-parallel-size {tensor_parallel}")
        if self.max_positions < self.seq_length:
            raise ConfigError(f"--max-position-embeddings {self.max_positions} < --seq-length {self.seq_length}")
        if self.transformer_impl not in (None, *TRANSFORMER_IMPLS):
            raise ConfigError(f"--transformer-impl must be local or transformer_engine, got {self.transformer_impl!r}")
        missing = transformer_engine_missing() if self.transformer_impl == "transformer_engine" else None
        if missing:
            raise ConfigError(f"--transformer-impl transformer_engine cannot run here: {missing}. Use "
                              f"--transformer-impl local (or leave it unset to choose automatically)")

    def padded_vocab_size(self, vocab_size: int, tensor_parallel: int = 1) -> int:
        """Megatron's padding: round the tokenizer's vocabulary up to a multiple of divisor x TP."""
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return ((vocab_size + multiple - 1) // multiple) * multiple

    def recompute_kwargs(self, pipeline_parallel: int = 1, transformer_engine: Optional[bool] = None) -> dict:
        """megatron TransformerConfig settings of the recompute flags (empty when off).

        Checks them first, with megatron's rules (Megatron-LM's ``validate_args`` and
        ``TransformerConfig.__post_init__``) as ConfigErrors naming our flags:
        :func:`check_recompute`. ``recompute_modules`` None is megatron's default, ["core_attn"].
        """
        granularity = check_recompute(self, pipeline_parallel, transformer_engine)
        if granularity is None:
            return {}
        return dict(recompute_granularity=granularity, recompute_method=self.recompute_method,
                    recompute_num_layers=self.recompute_num_layers,
                    recompute_modules=list(self.recompute_modules) or None)


_SELECTIVE = "selective recomputation (--recompute-granularity selective, or --recompute-activations)"
_REFUSED_MODULES = {
    "moe_act": "recomputes the activation of megatron's grouped-GEMM experts (--moe-grouped-gemm), which "
               "this model does not use: recompute whole MoE layers with --recompute-modules moe",
    "mla_up_proj": "needs multi-latent attention, which this model does not have",
    "shared_experts": "recomputes shared experts, which this model does not have",
}


def check_recompute(model: ModelConfig, pipeline_parallel: int = 1,
                    transformer_engine: Optional[bool] = None) -> Optional[str]:
    """The effective recompute granularity (None: off) of ``model``'s flags, or ConfigError.

    ``--recompute-activations`` means selective (as in Megatron-LM). Full needs a method and a
    number of layers between 1 and the layers of a pipeline stage (uniform: dividing them, since
    megatron checkpoints chunks of that many layers); selective takes neither and recomputes the
    ``--recompute-modules`` of every layer. ``transformer_engine``: whether the model uses it
    (None: not known yet, as in preflight; ``layernorm`` needs it).
    """
    granularity = "selective" if model.recompute_activations else model.recompute_granularity
    if model.recompute_granularity not in (None, *RECOMPUTE_GRANULARITIES):
        raise ConfigError(f"--recompute-granularity must be full or selective, got {model.recompute_granularity!r}")
    if model.recompute_method not in (None, *RECOMPUTE_METHODS):
        raise ConfigError(f"--recompute-method must be uniform or block, got {model.recompute_method!r}")
    if model.recompute_activations and model.recompute_granularity == "full":
        raise ConfigError("--recompute-activations means --recompute-granularity selective; it contradicts "
                          "--recompute-granularity full: drop one of them")
    if granularity is None:
        given = [flag for flag, value in (("--recompute-method", model.recompute_method),
                                          ("--recompute-num-layers", model.recompute_num_layers),
                                          ("--recompute-modules", model.recompute_modules)) if value]
        if given:
            raise ConfigError(f"{' and '.join(given)} do nothing without activation recomputation: add "
                              f"--recompute-granularity full (method, layers) or selective (modules)")
        return None
    if granularity == "selective":
        _check_selective(model, transformer_engine)
    else:
        _check_full(model, pipeline_parallel)
    return granularity


def _check_selective(model: ModelConfig, transformer_engine: Optional[bool]) -> None:
    if model.recompute_method is not None:
        raise ConfigError(f"--recompute-method is not supported with {_SELECTIVE}, which recomputes the "
                          f"--recompute-modules of every layer: drop --recompute-method")
    if model.recompute_num_layers is not None:
        raise ConfigError(f"--recompute-num-layers is not supported with {_SELECTIVE}, which recomputes the "
                          f"--recompute-modules of every layer: drop --recompute-num-layers")
    for name in model.recompute_modules:
        if name not in RECOMPUTE_MODULES:
            raise ConfigError(f"--recompute-modules {name}: unknown; choose from "
                              f"{', '.join(m for m in RECOMPUTE_MODULES if m not in _REFUSED_MODULES)}")
        if name in _REFUSED_MODULES:
            raise ConfigError(f"--recompute-modules {name} {_REFUSED_MODULES[name]}")
        if name == "layernorm" and transformer_engine is False:
            raise ConfigError("--recompute-modules layernorm needs transformer-engine (megatron-core 0.16's "
                              "output-discarding checkpoint reads its FP8 state), which this run does not use "
                              "(no CUDA or not installed): use core_attn, mlp or moe")


def _check_full(model: ModelConfig, pipeline_parallel: int) -> None:
    if model.recompute_modules:
        raise ConfigError("--recompute-modules chooses what selective recomputation re-runs; "
                          "--recompute-granularity full re-runs whole layers: drop --recompute-modules")
    if model.recompute_method is None:
        raise ConfigError("--recompute-granularity full needs --recompute-method uniform or block")
    per_stage = (model.num_layers or 0) // max(pipeline_parallel, 1)
    if model.recompute_num_layers is None or not 1 <= model.recompute_num_layers <= per_stage:
        got = "" if model.recompute_num_layers is None else f", got {model.recompute_num_layers}"
        raise ConfigError(f"--recompute-granularity full needs --recompute-num-layers between 1 and {per_stage}, "
                          f"the layers of a pipeline stage (--num-layers {model.num_layers} / "
                          f"--pipeline-model-parallel-size {pipeline_parallel}){got}")
    if model.recompute_method == "uniform" and per_stage % model.recompute_num_layers:
        raise ConfigError(f"--recompute-method uniform recomputes chunks of --recompute-num-layers "
                          f"{model.recompute_num_layers} layers, which must divide the {per_stage} layers of "
                          f"a pipeline stage: use a divisor of {per_stage}, or --recompute-method block")

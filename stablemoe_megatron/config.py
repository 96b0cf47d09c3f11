"""The run's configuration tree: typed dataclasses, the single source of truth.

``RunConfig`` groups the sections below. The command line (Megatron-LM flag names) is generated
from the fields by :mod:`stablemoe_megatron.cli_args`; ``--config FILE.yaml`` is applied before the
flags; the resolved tree is written as YAML next to every run and into every checkpoint.
Field ``metadata`` carries the help text, ``choices``, an explicit ``flag`` where the Megatron name
differs from ``--<prefix><field-name>``, and ``aliases``.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.model.config import ModelConfig
from stablemoe_megatron.moe.config import MoEConfig


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = field(default=1, metadata={"range": "[1, inf)", "help": "tensor parallel size"})
    pipeline_model_parallel_size: int = field(default=1, metadata={"range": "[1, inf)", "help": "pipeline parallel size"})
    expert_model_parallel_size: int = field(default=1, metadata={"range": "[1, inf)", "help": "expert parallel size"})
    sequence_parallel: bool = field(default=False, metadata={
        "help": "split activations along the sequence over TP ranks (required for MoE with TP > 1)"})
    use_distributed_optimizer: bool = field(default=False, metadata={
        "help": "shard optimizer state over data-parallel ranks (ZeRO-1)"})
    expert_tensor_parallel_size: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "split each expert's FFN over this many ranks (fc1 column-, fc2 row-parallel, as "
                "Megatron-LM); unset means 1 here: experts whole on each rank (Megatron-LM: unset means "
                "--tensor-model-parallel-size)"})
    context_parallel_size: int = field(default=1, metadata={"range": "[1, inf)",
        "help": "context parallel size; only 1 is supported (see docs/MEGATRON_FLAGS.md)"})


@dataclass
class OptimizerConfig:
    lr: float = field(default=6e-4, metadata={"range": "[0, inf)", "help": "peak learning rate"})
    min_lr: float = field(default=0.0, metadata={"range": "[0, inf)", "help": "learning rate at the end of decay"})
    lr_decay_style: str = field(default="linear", metadata={
        "help": "decay after warm-up", "choices": ("constant", "linear", "cosine", "inverse-square-root")})
    lr_warmup_iters: int = field(default=0, metadata={"range": "[0, inf)", "help": "linear warm-up iterations"})
    lr_warmup_samples: int = field(default=0, metadata={"range": "[0, inf)",
        "help": "linear warm-up in samples (with --train-samples)"})
    lr_warmup_fraction: Optional[float] = field(default=None, metadata={"range": "[0, 1]",
        "help": "warm-up as a fraction of the decay length (instead of --lr-warmup-iters/-samples)"})
    lr_decay_iters: Optional[int] = field(default=None, metadata={"range": "[1, inf)", "help": "decay length (default --train-iters)"})
    lr_decay_samples: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "decay length in samples (with --train-samples; default --train-samples)"})
    weight_decay: float = field(default=0.01, metadata={"range": "[0, inf)", "help": "decoupled weight decay (AdamW)"})
    adam_beta1: float = field(default=0.9, metadata={"range": "[0, 1)", "help": "Adam beta1"})
    adam_beta2: float = field(default=0.999, metadata={"range": "[0, 1)", "help": "Adam beta2 (paper: 0.98)"})
    adam_eps: float = field(default=1e-8, metadata={"range": "(0, inf)", "help": "Adam epsilon"})
    clip_grad: float = field(default=1.0, metadata={"range": "[0, inf)", "help": "global gradient-norm clip (paper: 0.1; 0 = off)"})


@dataclass
class TrainingConfig:
    micro_batch_size: int = field(default=4, metadata={"range": "[1, inf)", "help": "samples per micro-batch per DP rank"})
    global_batch_size: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "samples per optimizer step over all DP ranks (default micro x DP)"})
    train_iters: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "optimizer steps (this or --train-samples is required)"})
    train_samples: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "samples to train on: --train-iters = this // --global-batch-size (instead of --train-iters)"})
    label_smoothing: float = field(default=0.0, metadata={"range": "[0, 1)", "help":
        "label smoothing of the training loss (--model-family encoder_decoder; the paper's translation "
        "runs: 0.1); validation reports the plain NLL"})
    seed: int = field(default=1234, metadata={"range": "[0, 4294967295]", "help": "random seed"})
    bf16: bool = field(default=False, metadata={
        "help": "bf16 parameters and compute; fp32 main weights and gradients (megatron's Float16Module)"})
    fp16: bool = field(default=False, metadata={
        "help": "fp16 parameters and compute; fp32 main weights and gradients, loss scaling (dynamic "
                "unless --loss-scale); iterations with inf/nan gradients are skipped"})
    loss_scale: Optional[float] = field(default=None, metadata={"range": "(0, inf)",
        "help": "static loss scale (positive powers of 2 can improve fp16 convergence); unset: dynamic "
                "loss scaling with --fp16"})
    initial_loss_scale: float = field(default=2.0 ** 32, metadata={"range": "(0, inf)",
        "help": "initial loss scale of dynamic loss scaling"})
    min_loss_scale: float = field(default=1.0, metadata={"range": "(0, inf)",
        "help": "lowest loss scale of dynamic loss scaling"})
    loss_scale_window: float = field(default=1000, metadata={"range": "[1, inf)",
        "help": "dynamic loss scaling doubles the scale after this many iterations without inf/nan gradients"})
    hysteresis: int = field(default=2, metadata={"range": "[1, inf)",
        "help": "dynamic loss scaling halves the scale at the N-th iteration with inf/nan gradients since "
                "the scale last grew, and at every one after it"})
    eval_interval: int = field(default=1000, metadata={"range": "[0, inf)", "help": "iterations between validations"})
    eval_iters: int = field(default=100, metadata={"range": "[0, inf)", "help": "validation micro-batch rounds per evaluation"})
    exit_interval: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "stop (after saving) once the iteration is a multiple of this"})
    exit_duration_in_mins: Optional[float] = field(default=None, metadata={"range": "(0, inf)",
        "help": "save and exit once this many minutes have passed since the start (checked after every "
                "iteration, the slowest rank decides)"})
    exit_signal_handler: bool = field(default=False, metadata={
        "help": "save and exit on SIGTERM (Megatron-LM's flag; here SIGTERM and SIGUSR1 always do, the flag "
                "changes nothing)"})

    def validate_precision(self) -> None:
        """The mixed-precision flags, with Megatron-LM's rules (``validate_args``, megatron-core's
        ``DynamicGradScaler``) as ConfigErrors naming our flags."""
        if self.fp16 and self.bf16:
            raise ConfigError("--fp16 and --bf16 both set: choose one precision")
        if self.min_loss_scale > self.initial_loss_scale:
            raise ConfigError(f"--min-loss-scale {self.min_loss_scale:g} is above --initial-loss-scale "
                              f"{self.initial_loss_scale:g}")
        if float(self.loss_scale_window) != int(self.loss_scale_window):
            raise ConfigError(f"--loss-scale-window must be a whole number of iterations, got "
                              f"{self.loss_scale_window} (the scale would never grow)")


@dataclass
class DataConfig:
    data_path: List[str] = field(default_factory=list, metadata={
        "help": "weighted blend 'W1 PREFIX1 W2 PREFIX2 ...' or PREFIX of .bin/.idx datasets"})
    split: str = field(default="969,30,1", metadata={"help": "train,valid,test split of --data-path"})
    valid_data_path: List[str] = field(default_factory=list, metadata={
        "help": "separate validation dataset(s); overrides the split's valid part"})
    test_data_path: List[str] = field(default_factory=list, metadata={
        "help": "separate test dataset(s); overrides the split's test part"})
    tokenizer_type: str = field(default="SentencePieceTokenizer", metadata={
        "help": "tokenizer (NullTokenizer: token ids as text, --vocab-size ids; for --mock-data)",
        "choices": ("SentencePieceTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer", "NullTokenizer")})
    vocab_size: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "vocabulary size of --tokenizer-type NullTokenizer (without the end-of-document id it adds)"})
    mock_data: bool = field(default=False, metadata={
        "help": "train on megatron-core's MockGPTDataset (synthetic token ids) instead of --data-path"})
    tokenizer_model: Optional[str] = field(default=None, metadata={"help": "tokenizer model file/dir"})
    vocab_file: Optional[str] = field(default=None, metadata={"help": "GPT-2 BPE vocab.json"})
    merge_file: Optional[str] = field(default=None, metadata={"help": "GPT-2 BPE merges.txt"})
    data_cache_path: Optional[str] = field(default=None, metadata={
        "help": "where megatron's dataset index caches go (default beside the data)"})
    num_workers: int = field(default=0, metadata={"range": "[0, inf)", "help": "data loader worker processes"})


@dataclass
class CheckpointConfig:
    save: Optional[str] = field(default=None, metadata={"help": "checkpoint directory to write"})
    load: Optional[str] = field(default=None, metadata={"help": "checkpoint directory to resume from"})
    save_interval: Optional[int] = field(default=None, metadata={"range": "[1, inf)", "help": "iterations between checkpoints"})
    no_load_optim: bool = field(default=False, metadata={"help": "load weights only (fresh optimizer)"})
    no_load_rng: bool = field(default=False, metadata={
        "help": "on resume, keep this run's freshly seeded RNG states instead of the checkpoint's"})
    pretrained_checkpoint: Optional[str] = field(default=None, metadata={
        "help": "start from the weights of this checkpoint (Megatron-LM's torch_dist, or this trainer's) at "
                "iteration 0, fresh optimizer and RNG, when --load holds no checkpoint yet (a restart "
                "resumes from --load); see docs/ARCHITECTURE.md, Megatron-LM checkpoints"})
    finetune: bool = field(default=False, metadata={
        "help": "load only the weights of --load (Megatron-LM's or this trainer's checkpoint): iteration 0, "
                "no optimizer, no RNG"})
    ckpt_format: str = field(default="torch_dist", metadata={
        "help": "checkpoint format; only torch_dist (megatron-core dist_checkpointing) is supported"})
    keep_last: Optional[int] = field(default=None, metadata={"range": "[1, inf)", "help": "keep only the N newest checkpoints"})
    start_fresh: bool = field(default=False, metadata={
        "help": "start at iteration 0 even if --save holds checkpoints; they are moved to "
                "SAVE/superseded_<time>/ (without it such a run stops and says so)"})


@dataclass
class LoggingConfig:
    log_interval: int = field(default=100, metadata={"range": "[1, inf)", "help": "iterations between log lines"})
    tensorboard_dir: Optional[str] = field(default=None, metadata={"help": "TensorBoard event directory"})
    metrics_file: Optional[str] = field(default=None, metadata={"help": "JSONL metrics file"})
    routing_probe_interval: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "iterations between routing probes (fluctuation tracking); absent = off"})
    routing_probe_tokens: int = field(default=4096, metadata={"range": "[1, inf)", "help": "held-out tokens in the routing probe"})
    eval_moe_bypass: bool = field(default=False, metadata={
        "help": "at every validation also evaluate with each paper-layout MoE block skipped (h_out = h: "
                "the backbone alone) and log it as split validation_moe_bypassed: how much the model "
                "relies on its MoE block"})


@dataclass
class MegatronCompatConfig:
    """Megatron-LM flags that a Megatron command line carries and that need no setting here: accepted
    with the effect each help names, so the command line runs unchanged (docs/MEGATRON_FLAGS.md)."""

    use_mcore_models: bool = field(default=False, metadata={
        "help": "accepted: the model is always megatron-core's GPTModel"})
    distributed_backend: Optional[str] = field(default=None, metadata={"choices": ("nccl", "gloo"),
        "help": "accepted: the backend follows the device (nccl with CUDA, gloo on CPU)"})
    moe_grouped_gemm: bool = field(default=False, metadata={"flag": "--moe-grouped-gemm",
        "help": "accepted: grouped expert GEMMs are used whenever transformer-engine is (see --transformer-impl)"})
    moe_router_load_balancing_type: str = field(default="aux_loss", metadata={
        "flag": "--moe-router-load-balancing-type", "choices": ("aux_loss", "none"),
        "help": "the load-balancing loss of --moe-router switch: aux_loss (weighted by --moe-aux-loss-coeff) or none "
                "(coefficient 0); the paper's routers have their own losses; seq_aux_loss / sinkhorn are not built"})
    overlap_grad_reduce: bool = field(default=False, metadata={
        "help": "overlap the data-parallel gradient reduce with the backward (megatron DDP's option)"})
    overlap_param_gather: bool = field(default=False, metadata={
        "help": "accepted, no effect here: the distributed optimizer's parameter all-gather runs after the step, "
                "not overlapped with the next forward"})
    attention_softmax_in_fp32: bool = field(default=False, metadata={
        "help": "attention softmax in fp32 under --bf16 / --fp16 (megatron's option)"})
    no_masked_softmax_fusion: bool = field(default=False, metadata={"flag": "--no-masked-softmax-fusion",
        "help": "accepted: fused kernels follow the device and transformer-engine (off on CPU)"})
    no_bias_dropout_fusion: bool = field(default=False, metadata={"flag": "--no-bias-dropout-fusion",
        "help": "accepted: fused kernels follow the device (off on CPU)"})
    no_bias_swiglu_fusion: bool = field(default=False, metadata={"flag": "--no-bias-swiglu-fusion",
        "help": "accepted: the bias-activation fusion is always off here"})
    no_bias_gelu_fusion: bool = field(default=False, metadata={"flag": "--no-bias-gelu-fusion",
        "help": "accepted: the bias-activation fusion is always off here"})
    no_gradient_accumulation_fusion: bool = field(default=False, metadata={"flag": "--no-gradient-accumulation-fusion",
        "help": "accepted: gradient-accumulation fusion is on only with transformer-engine on CUDA"})
    no_rope_fusion: bool = field(default=False, metadata={"flag": "--no-rope-fusion",
        "help": "accepted: RoPE fusion is on only with transformer-engine on CUDA"})
    log_throughput: bool = field(default=False, metadata={
        "help": "accepted: every log line carries tokens per second"})


SECTIONS = {
    # section name -> (dataclass, flag prefix)
    "model": (ModelConfig, ""),
    "moe": (MoEConfig, "moe-"),
    "parallel": (ParallelConfig, ""),
    "optimizer": (OptimizerConfig, ""),
    "training": (TrainingConfig, ""),
    "data": (DataConfig, ""),
    "checkpoint": (CheckpointConfig, ""),
    "logging": (LoggingConfig, ""),
    "megatron": (MegatronCompatConfig, ""),
}

# Flags whose Megatron name is not --<prefix><field>.
FLAG_OVERRIDES = {("moe", "num_experts"): "--num-experts"}


def flag_name(section: str, name: str) -> str:
    """The command-line flag of ``section.name`` (Megatron-LM's spelling)."""
    if (section, name) in FLAG_OVERRIDES:
        return FLAG_OVERRIDES[(section, name)]
    fld = next((f for f in dataclasses.fields(SECTIONS[section][0]) if f.name == name), None)
    if fld is not None and "flag" in fld.metadata:
        return fld.metadata["flag"]
    return f"--{SECTIONS[section][1]}{name.replace('_', '-')}"


def parse_range(text: str) -> Tuple[float, float, bool, bool]:
    """``"[1, inf)"`` -> (low 1, high inf, low included, high excluded)."""
    match = re.fullmatch(r"([\[(])\s*([^,]+?)\s*,\s*([^\])]+?)\s*([\])])", text)
    if match is None:
        raise ValueError(f"bad range {text!r}")
    return float(match.group(2)), float(match.group(3)), match.group(1) == "[", match.group(4) == "]"


def describe_range(text: str) -> str:
    """Readable form of a range: ">= 1", "> 0", "in [0, 1)"."""
    low, high, low_in, _ = parse_range(text)
    if math.isinf(high):
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {text}"


def in_range(value, text: str) -> bool:
    low, high, low_in, high_in = parse_range(text)
    if not math.isfinite(float(value)) and not (math.isinf(high) and value == high):
        return False
    above = value >= low if low_in else value > low
    below = value <= high if high_in else value < high
    return above and below


def check_ranges(config: "RunConfig") -> None:
    """ConfigError for the first numeric setting outside the ``range`` its field declares."""
    for section, (cls, _) in SECTIONS.items():
        values = getattr(config, section)
        for fld in dataclasses.fields(cls):
            text, value = fld.metadata.get("range"), getattr(values, fld.name)
            if text is None or value is None or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)) or not in_range(value, text):
                raise ConfigError(f"{flag_name(section, fld.name)} must be {describe_range(text)}, got {value}")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    megatron: MegatronCompatConfig = field(default_factory=MegatronCompatConfig)

    # -- (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        """Build from a nested dict; unknown sections or keys are a ConfigError naming them."""
        config = cls()
        for section, entries in (values or {}).items():
            if section not in SECTIONS:
                raise ConfigError(f"unknown config section {section!r}; sections: {', '.join(SECTIONS)}")
            target = getattr(config, section)
            names = {f.name for f in dataclasses.fields(target)}
            for key, value in (entries or {}).items():
                if key not in names:
                    raise ConfigError(f"unknown setting {section}.{key}; known: {', '.join(sorted(names))}")
                setattr(target, key, value)
        return config

    # -- derived values ------------------------------------------------------------------------
    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tensor_model_parallel_size * self.parallel.pipeline_model_parallel_size)

    def global_batch(self, world_size: int) -> int:
        return self.training.global_batch_size or self.training.micro_batch_size * self.data_parallel_size(world_size)

    def num_microbatches(self, world_size: int) -> int:
        return self.global_batch(world_size) // (self.training.micro_batch_size * self.data_parallel_size(world_size))

    def validate(self, world_size: int) -> None:
        """Every check that needs no data or checkpoint; ConfigError names the flags and the fix."""
        check_ranges(self)
        self.training.validate_precision()
        self._validate_sizes(world_size)
        self._validate_unsupported()
        self._validate_batch(world_size)
        self._resolve_train_samples(world_size)
        if self.megatron.moe_router_load_balancing_type == "none":  # Megatron-LM: no load-balancing loss
            self.moe.aux_loss_coeff = 0.0
        if self.megatron.overlap_grad_reduce and self.parallel.pipeline_model_parallel_size > 1:
            raise ConfigError("--overlap-grad-reduce with --pipeline-model-parallel-size > 1 is not supported here: "
                              "drop --overlap-grad-reduce")
        for stack_layers in sorted({self.model.encoder_layers, self.model.decoder_layers}
                                   if self.model.model_family == "encoder_decoder" else {self.model.num_layers}):
            self.moe.validate(stack_layers, self.training.train_iters)
        self._validate_layout()
        self._validate_schedule()
        self._validate_data()
        if self.logging.eval_moe_bypass and (not self.moe.enabled or self.moe.megatron_layout):
            raise ConfigError("--eval-moe-bypass skips the paper-layout MoE blocks; this model has none "
                              "(dense, or --moe-layer-freq puts the experts in the MLPs): drop --eval-moe-bypass")

    def _resolve_train_samples(self, world_size: int) -> None:
        """--train-samples -> --train-iters (samples // global batch), as Megatron-LM does."""
        t, batch = self.training, self.global_batch(world_size)
        if t.train_iters is None and t.train_samples is None:
            raise ConfigError("--train-iters or --train-samples is required")
        if t.train_samples is None:
            return
        iters = t.train_samples // batch
        if t.train_iters is not None and t.train_iters != iters:  # (equal: resolved here before)
            raise ConfigError("give one of --train-iters and --train-samples")
        if iters < 1:
            raise ConfigError(f"--train-samples {t.train_samples} is less than one global batch ({batch} samples)")
        t.train_iters = iters

    def _validate_schedule(self) -> None:
        opt = self.optimizer
        if opt.min_lr > opt.lr:
            raise ConfigError(f"--min-lr {opt.min_lr} is above --lr {opt.lr}")
        given = [name for name, on in (("--lr-warmup-iters", opt.lr_warmup_iters), ("--lr-warmup-samples",
                 opt.lr_warmup_samples), ("--lr-warmup-fraction", opt.lr_warmup_fraction is not None)) if on]
        if len(given) > 1:
            raise ConfigError(f"give one of {' and '.join(given)}: both set the warm-up length")
        if opt.lr_decay_iters is not None and opt.lr_decay_samples is not None:
            raise ConfigError("give one of --lr-decay-iters and --lr-decay-samples")

    def _validate_data(self) -> None:
        data = self.data
        if data.mock_data and data.data_path:
            raise ConfigError("--mock-data trains on synthetic tokens: drop --data-path (or --mock-data)")
        if not data.data_path and not data.mock_data:
            raise ConfigError("--data-path is required: a PREFIX of a .bin/.idx dataset (see tools/preprocess_data.py), "
                              "or --mock-data for synthetic tokens")
        if data.tokenizer_type == "NullTokenizer" and data.vocab_size is None:
            raise ConfigError("--tokenizer-type NullTokenizer needs --vocab-size")

    def _validate_unsupported(self) -> None:
        """Megatron-LM flags accepted by name whose other values are not built here: one line each."""
        par = self.parallel
        if par.context_parallel_size != 1:
            raise ConfigError(f"--context-parallel-size {par.context_parallel_size} is not supported: context "
                              f"parallelism is not built here (sequences are split only by --sequence-parallel "
                              f"over the tensor-parallel ranks); use 1")
        if self.checkpoint.ckpt_format != "torch_dist":
            raise ConfigError(f"--ckpt-format {self.checkpoint.ckpt_format} is not supported: checkpoints are "
                              f"torch_dist (megatron-core dist_checkpointing, reshardable across layouts); "
                              f"use --ckpt-format torch_dist")

    def fits_layout(self, world_size: int) -> bool:
        """Whether the parallel layout works for ``world_size`` processes and this model."""
        try:
            self._validate_sizes(world_size)
            self._validate_layout()
        except ConfigError:
            return False
        return True

    def _validate_sizes(self, world_size: int) -> None:
        """TP x PP x EP against the world size, the model's shape against TP."""
        from stablemoe_megatron.parallel import ParallelSizes

        par = self.parallel
        ParallelSizes(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                      par.expert_model_parallel_size, par.expert_tensor_parallel_size or 1).validate(world_size)
        self.model.validate(par.tensor_model_parallel_size)
        self.model.validate_family(par.pipeline_model_parallel_size)

    def _validate_layout(self) -> None:
        """Experts vs EP, sequence parallelism for MoE under TP, layers vs PP."""
        par = self.parallel
        if self.moe.enabled and self.moe.num_experts % par.expert_model_parallel_size:
            raise ConfigError(f"--num-experts {self.moe.num_experts} is not divisible by "
                              f"--expert-model-parallel-size {par.expert_model_parallel_size}")
        if not self.moe.enabled and par.expert_model_parallel_size > 1:
            raise ConfigError("--expert-model-parallel-size > 1 needs an MoE model: add --num-experts")
        if self.moe.enabled and par.tensor_model_parallel_size > 1 and not par.sequence_parallel:
            raise ConfigError("MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel "
                              "(each TP rank routes its own sequence shard)")
        if self.model.num_layers % par.pipeline_model_parallel_size:
            raise ConfigError(f"--num-layers {self.model.num_layers} is not divisible by "
                              f"--pipeline-model-parallel-size {par.pipeline_model_parallel_size}")
        self._validate_expert_tensor_parallel()

    def _validate_expert_tensor_parallel(self) -> None:
        """--expert-tensor-parallel-size > 1: an MoE model whose expert FFN it divides, without biases."""
        etp = self.parallel.expert_tensor_parallel_size or 1
        if etp == 1:
            return
        flag = f"--expert-tensor-parallel-size {etp}"
        if not self.moe.enabled:
            raise ConfigError(f"{flag} splits the experts' FFNs; this model has none: add --num-experts or use 1")
        ffn = self.moe.expert_ffn_hidden_size or self.model.ffn_size
        if ffn % etp:
            raise ConfigError(f"{flag} does not divide the expert FFN size {ffn} (--moe-expert-ffn-hidden-size, "
                              f"default --ffn-hidden-size): choose a divisor of {ffn}")
        if self.model.add_bias_linear:
            raise ConfigError(f"{flag} needs bias-free experts (Megatron-LM: bias in MoE only with expert "
                              f"tensor parallel size 1): add --disable-bias-linear or use 1")

    def _validate_batch(self, world_size: int) -> None:
        micro, dp = self.training.micro_batch_size, self.data_parallel_size(world_size)
        if micro < 1:
            raise ConfigError("--micro-batch-size must be >= 1")
        par = self.parallel
        local_tokens = micro * self.model.seq_length // (par.tensor_model_parallel_size if par.sequence_parallel else 1)
        if self.moe.enabled and self.moe.shuffles_tokens and local_tokens % dp:
            raise ConfigError(f"--moe-token-shuffle (on by default) sends {local_tokens // dp} of each rank's "
                              f"{local_tokens} tokens per micro-batch to each of the {dp} data-parallel ranks, "
                              f"which needs --micro-batch-size x --seq-length (per sequence-parallel shard) "
                              f"divisible by {dp}: change them, or add --no-moe-token-shuffle")
        if self.global_batch(world_size) % (micro * dp):
            raise ConfigError(f"--global-batch-size {self.global_batch(world_size)} is not divisible by "
                              f"--micro-batch-size {micro} x data-parallel size {dp}")

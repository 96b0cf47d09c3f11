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


@dataclass
class OptimizerConfig:
    lr: float = field(default=6e-4, metadata={"range": "[0, inf)", "help": "peak learning rate"})
    min_lr: float = field(default=0.0, metadata={"range": "[0, inf)", "help": "learning rate at the end of decay"})
    lr_decay_style: str = field(default="linear", metadata={
        "help": "decay after warm-up", "choices": ("constant", "linear", "cosine")})
    lr_warmup_iters: int = field(default=0, metadata={"range": "[0, inf)", "help": "linear warm-up iterations"})
    lr_decay_iters: Optional[int] = field(default=None, metadata={"range": "[1, inf)", "help": "decay length (default --train-iters)"})
    weight_decay: float = field(default=0.01, metadata={"range": "[0, inf)", "help": "decoupled weight decay (AdamW)"})
    adam_beta1: float = field(default=0.9, metadata={"range": "[0, 1)", "help": "Adam beta1"})
    adam_beta2: float = field(default=0.98, metadata={"range": "[0, 1)", "help": "Adam beta2 (paper: 0.98)"})
    adam_eps: float = field(default=1e-8, metadata={"range": "(0, inf)", "help": "Adam epsilon"})
    clip_grad: float = field(default=0.1, metadata={"range": "[0, inf)", "help": "global gradient-norm clip (paper: 0.1; 0 = off)"})


@dataclass
class TrainingConfig:
    micro_batch_size: int = field(default=4, metadata={"range": "[1, inf)", "help": "samples per micro-batch per DP rank"})
    global_batch_size: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "samples per optimizer step over all DP ranks (default micro x DP)"})
    train_iters: int = field(default=1000, metadata={"range": "[1, inf)", "help": "optimizer steps"})
    seed: int = field(default=1234, metadata={"range": "[0, 4294967295]", "help": "random seed"})
    bf16: bool = field(default=False, metadata={"help": "bf16 parameters and compute (GPU)"})
    eval_interval: int = field(default=1000, metadata={"range": "[0, inf)", "help": "iterations between validations"})
    eval_iters: int = field(default=10, metadata={"range": "[0, inf)", "help": "validation micro-batch rounds per evaluation"})
    exit_interval: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "stop (after saving) once the iteration is a multiple of this"})


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
        "help": "tokenizer", "choices": ("SentencePieceTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer")})
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
    keep_last: Optional[int] = field(default=None, metadata={"range": "[1, inf)", "help": "keep only the N newest checkpoints"})
    start_fresh: bool = field(default=False, metadata={
        "help": "start at iteration 0 even if --save holds checkpoints; they are moved to "
                "SAVE/superseded_<time>/ (without it such a run stops and says so)"})


@dataclass
class LoggingConfig:
    log_interval: int = field(default=10, metadata={"range": "[1, inf)", "help": "iterations between log lines"})
    tensorboard_dir: Optional[str] = field(default=None, metadata={"help": "TensorBoard event directory"})
    metrics_file: Optional[str] = field(default=None, metadata={"help": "JSONL metrics file"})
    routing_probe_interval: Optional[int] = field(default=None, metadata={"range": "[1, inf)",
        "help": "iterations between routing probes (fluctuation tracking); absent = off"})
    routing_probe_tokens: int = field(default=4096, metadata={"range": "[1, inf)", "help": "held-out tokens in the routing probe"})
    eval_moe_bypass: bool = field(default=False, metadata={
        "help": "at every validation also evaluate with each paper-layout MoE block skipped (h_out = h: "
                "the backbone alone) and log it as split validation_moe_bypassed: how much the model "
                "relies on its MoE block"})


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
}

# Flags whose Megatron name is not --<prefix><field>.
FLAG_OVERRIDES = {("moe", "num_experts"): "--num-experts"}


def flag_name(section: str, name: str) -> str:
    """The command-line flag of ``section.name`` (Megatron-LM's spelling)."""
    return FLAG_OVERRIDES.get((section, name)) or f"--{SECTIONS[section][1]}{name.replace('_', '-')}"


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
        self._validate_sizes(world_size)
        self.moe.validate(self.model.num_layers, self.training.train_iters)
        self._validate_layout()
        self._validate_batch(world_size)
        if self.optimizer.min_lr > self.optimizer.lr:
            raise ConfigError(f"--min-lr {self.optimizer.min_lr} is above --lr {self.optimizer.lr}")
        if not self.data.data_path:
            raise ConfigError("--data-path is required: a PREFIX of a .bin/.idx dataset (see tools/preprocess_data.py)")
        if self.logging.eval_moe_bypass and (not self.moe.enabled or self.moe.megatron_layout):
            raise ConfigError("--eval-moe-bypass skips the paper-layout MoE blocks; this model has none "
                              "(dense, or --moe-layer-freq puts the experts in the MLPs): drop --eval-moe-bypass")

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
                      par.expert_model_parallel_size).validate(world_size)
        self.model.validate(par.tensor_model_parallel_size)

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

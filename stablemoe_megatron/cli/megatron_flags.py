"""The Megatron-LM flag table (docs/MEGATRON_FLAGS.md): each common Megatron-LM ``pretrain_gpt.py`` flag,
its Megatron-LM default, and what it does here: the same, differs (how), or not supported (why).

The rows are generated: whether a flag is accepted and its default here come from the command line
built from the config tree (:func:`stablemoe_megatron.cli_args.build_parser`); Megatron-LM's defaults
(release core_v0.16.1, ``megatron/training/arguments.py``) and the notes are recorded below.

    python tools/megatron_flags.py            # print the table
    python tools/megatron_flags.py --write    # regenerate docs/MEGATRON_FLAGS.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REQUIRED = "required"
UNSET = None
NOT_BUILT = "not supported"

# flag -> (Megatron-LM default, note). A note starting with "not supported" marks values other than
# the default as refused (one ConfigError naming the flag and why); any other note says how ours differs
# beyond the default. Defaults are written as Megatron-LM's argparse defaults (store_true flags: False).
MEGATRON_FLAGS: Dict[str, Tuple[object, Optional[str]]] = {
    # model shape
    "--num-layers": (REQUIRED, None),
    "--hidden-size": (REQUIRED, None),
    "--ffn-hidden-size": (UNSET, "default 4h, with --swiglu int(8h/3/64)*64, as Megatron-LM"),
    "--num-attention-heads": (REQUIRED, None),
    "--seq-length": (REQUIRED, None),
    # encoder-decoder (Megatron-LM's pretrain_t5.py flags; here with --model-family encoder_decoder)
    "--encoder-num-layers": (UNSET, "default --num-layers; translation models only (--model-family encoder_decoder)"),
    "--decoder-num-layers": (UNSET, "default --num-layers; translation models only"),
    "--encoder-seq-length": (UNSET, "longest source (default --seq-length); translation models only"),
    "--decoder-seq-length": (UNSET, "longest target (default --seq-length); translation models only"),
    "--max-position-embeddings": (UNSET, "default --seq-length (Megatron-LM requires it, >= --seq-length, for every "
                                         "position embedding type)"),
    "--position-embedding-type": ("learned_absolute", None),
    "--normalization": ("LayerNorm", None),
    "--swiglu": (False, None),
    "--disable-bias-linear": (False, "routers stay bias-free; export (tools/convert_checkpoint.py) needs bias-free models"),
    "--hidden-dropout": (0.1, None),
    "--attention-dropout": (0.1, None),
    "--init-method-std": (0.02, None),
    "--untie-embeddings-and-output-weights": (False, None),
    "--make-vocab-size-divisible-by": (128, None),
    "--transformer-impl": ("transformer_engine", "default: transformer-engine when it is installed and CUDA is "
                                                  "present, else local"),
    # MoE
    "--num-experts": (UNSET, "alone it builds the paper's MoE block after layer L/2 (Megatron-LM: MoE in every "
                             "layer); --moe-layer-freq gives Megatron-LM's placement"),
    "--moe-layer-freq": (1, "only applies when given (see --num-experts); same meaning and list patterns"),
    "--moe-router-topk": (2, "default: the router's, 1 (the paper's routers are top-1); k > 1 with --moe-router switch"),
    "--moe-router-pre-softmax": (False, "default: on for top-1 (the Switch gate; Megatron-LM stops unless it is "
                                        "given with k = 1), off for k > 1 as Megatron-LM"),
    "--moe-aux-loss-coeff": (0.0, "one value (Megatron-LM: one per balancing type); default 0.01 for --moe-router switch"),
    "--moe-z-loss-coeff": (UNSET, "default 0 (unset in Megatron-LM means off too)"),
    "--moe-expert-capacity-factor": (UNSET, "absent: the router's default (stablemoe 2, the authors' run)"),
    "--moe-router-load-balancing-type": ("aux_loss", "aux_loss and none; " + NOT_BUILT + ": seq_aux_loss, "
                                                                 "global_aux_loss, sinkhorn"),
    "--moe-token-dispatcher-type": ("allgather", "always an all-to-all exchange (allgather accepted, same results); "
                                                 + NOT_BUILT + ": flex (needs DeepEP on GPUs)"),
    "--moe-grouped-gemm": (False, "accepted: grouped GEMMs whenever transformer-engine is used"),
    "--moe-use-upcycling": (False, None),
    # parallelism
    "--tensor-model-parallel-size": (1, None),
    "--pipeline-model-parallel-size": (1, None),
    "--expert-model-parallel-size": (1, None),
    "--expert-tensor-parallel-size": (UNSET, "unset means 1 here (experts whole on each rank); Megatron-LM: the "
                                             "tensor-parallel size; needs --disable-bias-linear, as Megatron-LM"),
    "--context-parallel-size": (1, NOT_BUILT + ": context parallelism is not built (values other than 1 stop)"),
    "--sequence-parallel": (False, "required for MoE with tensor parallelism"),
    "--use-distributed-optimizer": (False, None),
    "--overlap-grad-reduce": (False, None),
    "--overlap-param-gather": (False, "accepted; the parameter all-gather is not overlapped here"),
    "--distributed-backend": ("nccl", "accepted: the backend follows the device (gloo on CPU)"),
    "--use-mcore-models": (False, "accepted: always megatron-core's GPTModel (deprecated and ignored in Megatron-LM)"),
    # optimisation
    "--lr": (UNSET, "default 6e-4 (GPT-2 small; Megatron-LM has no default and its LR scheduler fails without one)"),
    "--min-lr": (0.0, None),
    "--lr-decay-style": ("linear", "constant, linear, cosine, inverse-square-root (" + NOT_BUILT + ": WSD)"),
    "--lr-warmup-iters": (0, None),
    "--lr-warmup-samples": (0, None),
    "--lr-warmup-fraction": (UNSET, None),
    "--lr-decay-iters": (UNSET, None),
    "--lr-decay-samples": (UNSET, None),
    "--weight-decay": (0.01, None),
    "--adam-beta1": (0.9, None),
    "--adam-beta2": (0.999, None),
    "--adam-eps": (1e-08, None),
    "--clip-grad": (1.0, None),
    # training
    "--micro-batch-size": (REQUIRED, "default 4"),
    "--global-batch-size": (UNSET, None),
    "--train-iters": (UNSET, None),
    "--train-samples": (UNSET, None),
    "--seed": (1234, None),
    "--bf16": (False, None),
    "--fp16": (False, None),
    "--loss-scale": (UNSET, None),
    "--initial-loss-scale": (4294967296.0, None),
    "--min-loss-scale": (1.0, None),
    "--loss-scale-window": (1000, None),
    "--hysteresis": (2, None),
    "--eval-interval": (UNSET, "default 1000 (Megatron-LM: unset = no evaluation during training; 1000 before "
                                "core_v0.16)"),
    "--eval-iters": (100, None),
    "--exit-interval": (UNSET, None),
    "--exit-duration-in-mins": (UNSET, None),
    "--exit-signal-handler": (False, "SIGTERM and SIGUSR1 always save and exit here"),
    "--recompute-granularity": (UNSET, None),
    "--recompute-method": (UNSET, None),
    "--recompute-num-layers": (UNSET, None),
    "--recompute-activations": (False, None),
    "--recompute-modules": (UNSET, "unset means core_attn, as Megatron-LM; moe supported; " + NOT_BUILT +
                           ": moe_act, mla_up_proj, shared_experts, layernorm without transformer-engine"),
    "--attention-softmax-in-fp32": (False, None),
    "--no-masked-softmax-fusion": (False, "accepted: fusions follow the device"),
    "--no-bias-dropout-fusion": (False, "accepted: fusions follow the device"),
    "--no-gradient-accumulation-fusion": (False, "accepted: on only with transformer-engine on CUDA"),
    # data
    "--data-path": (UNSET, None),
    "--split": (UNSET, "default 969,30,1 (Megatron-LM's legacy value, with a warning, when --data-path is given "
                       "without --split)"),
    "--valid-data-path": (UNSET, None),
    "--test-data-path": (UNSET, None),
    "--mock-data": (False, None),
    "--tokenizer-type": (UNSET, "SentencePieceTokenizer, GPT2BPETokenizer, HuggingFaceTokenizer, NullTokenizer"),
    "--tokenizer-model": (UNSET, None),
    "--vocab-file": (UNSET, None),
    "--merge-file": (UNSET, None),
    "--vocab-size": (UNSET, None),
    "--data-cache-path": (UNSET, None),
    "--num-workers": (2, None),
    # checkpoints
    "--save": (UNSET, None),
    "--load": (UNSET, None),
    "--save-interval": (UNSET, None),
    "--no-load-optim": (False, None),
    "--no-load-rng": (False, None),
    "--finetune": (False, None),
    "--pretrained-checkpoint": (UNSET, None),
    "--ckpt-format": ("torch_dist", NOT_BUILT + ": torch, torch_dcp, fsdp_dtensor (values other than torch_dist "
                                    "stop)"),
    # logging
    "--log-interval": (100, None),
    "--tensorboard-dir": (UNSET, None),
    "--log-throughput": (False, "accepted: every log line has tokens per second"),
}


def _our_actions() -> Dict[str, argparse.Action]:
    from stablemoe_megatron.cli_args import build_parser

    return build_parser()._option_string_actions


def _our_default(flag: str, action: argparse.Action):
    """Our default of ``flag`` as Megatron-LM would write it (a store_false flag's default is False)."""
    import dataclasses

    from stablemoe_megatron.config import SECTIONS

    section, name = action.dest.split(".", 1)
    fld = next(f for f in dataclasses.fields(SECTIONS[section][0]) if f.name == name)
    default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()
    if isinstance(action, argparse._StoreFalseAction):
        return not default if isinstance(default, bool) else default
    return default if default != [] else None


def _shown(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def rows() -> List[Tuple[str, str, str, str]]:
    """(flag, Megatron-LM default, ours, verdict) for every recorded flag."""
    actions, out = _our_actions(), []
    for flag, (megatron_default, note) in MEGATRON_FLAGS.items():
        action = actions.get(flag)
        if action is None:
            out.append((flag, _shown(megatron_default), "not accepted", "not supported"))
            continue
        ours = _our_default(flag, action)
        required = megatron_default == REQUIRED
        same_default = (ours is None) if required else _shown(ours) == _shown(megatron_default)
        ours_text = "required" if required and ours is None else _shown(ours)
        if note and note.startswith(NOT_BUILT):
            verdict = note
        elif note:
            verdict = f"differs: {note}" if not same_default or not note.startswith("accepted") else note
        else:
            verdict = "same" if same_default else f"differs: default {ours_text}"
        out.append((flag, _shown(megatron_default), ours_text, verdict))
    return out


def table() -> str:
    lines = ["| Megatron-LM flag | Megatron-LM default | ours (default) | here |", "|---|---|---|---|"]
    lines += [f"| `{flag}` | {theirs} | {ours} | {verdict} |" for flag, theirs, ours, verdict in rows()]
    return "\n".join(lines) + "\n"


HEADER = """# Megatron-LM flags

Generated by `python tools/megatron_flags.py --write` from the trainer's command line and the record of
Megatron-LM's defaults (release core_v0.16.1, `megatron/training/arguments.py`) in
`stablemoe_megatron/cli/megatron_flags.py`; a test fails when this file is out of date.

*same*: accepted with Megatron-LM's meaning and default. *differs*: accepted with Megatron-LM's
meaning; how it differs. *not supported*: the values named stop the trainer before any work with one
line saying why. Every flag of the trainer: `stablemoe-train --help`. The paper's values (no dropout,
Adam beta2 0.98, clip 0.1, bias-free linears, ReLU) are in the size configs `configs/*.yaml`.

"""


def document() -> str:
    return HEADER + table()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron_flags", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write docs/MEGATRON_FLAGS.md")
    args = parser.parse_args(argv)
    text = document()
    if args.write:
        path = Path(__file__).resolve().parents[2] / "docs" / "MEGATRON_FLAGS.md"
        path.write_text(text)
        print(f"wrote {path}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

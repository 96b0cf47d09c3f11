"""Use an exported model without Megatron: perplexity of a text corpus, continuation of a prompt.

    model, tokenizer = load("exported/")
    result = perplexity(model, token_stream(tokenizer, documents), seq_length=1024)
    text = generate_text(model, tokenizer, "The theory of", max_new_tokens=40,
                         sampling=Sampling(temperature=0.8, top_p=0.9, repetition_penalty=1.2), seed=0)

Perplexity follows the trainer's data convention: each document is tokenised and followed by the
end-of-document id (``--append-eod``), the documents are concatenated in file order, and the whole
stream is cut into consecutive, non-overlapping windows of ``seq_length`` predictions (a window
holds ``seq_length + 1`` tokens: inputs = its first ``seq_length``, labels = the next token of
each, so its last token is the next window's first input); a final partial window is used as far
as it goes. No context is carried across windows. Every token but the first is scored exactly
once; the result is the mean next-token loss over them and its exponential. The trainer's test
perplexity instead averages ``--eval-iters`` global batches of windows drawn from its test split
in megatron's shuffled order, so the two numbers measure different token sets.

Generation recomputes the whole (cropped) context each step: correct for every router, including
the context-dependent distilled routers, and fast enough for a reference model. Each step applies
the repetition penalty, then temperature (0 = greedy argmax), top-k and top-p (nucleus)
filtering, then draws from the softmax with a seeded ``torch.Generator`` (see :class:`Sampling`).
The text is the detokenisation of the prompt's ids and the new ids together, so word boundaries
between them come out right (SentencePiece marks a word start on the following piece).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import torch

from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.export.model import ExportedGPT


def load(export_dir, device: str = "cpu", dtype: Optional[torch.dtype] = None):
    """(ExportedGPT in eval mode, the export's tokenizer)."""
    from stablemoe_megatron.export.tokenizer_files import load_tokenizer

    model = ExportedGPT.from_pretrained(export_dir, device=device, dtype=dtype)
    return model, load_tokenizer(export_dir, model.config.tokenizer)


def read_documents(path) -> List[str]:
    """Documents of a ``.jsonl`` file (its "text" fields) or a plain text file (one document)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--input {path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        return [text]
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            documents.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path}:{number}: expected a JSON object with a \"text\" field") from None
    return documents


def token_stream(tokenizer, documents: Iterable[str]) -> torch.Tensor:
    """LongTensor [N]: every document's tokens followed by the end-of-document id."""
    ids: List[int] = []
    for document in documents:
        ids.extend(tokenizer.tokenize(document))
        ids.append(tokenizer.eod)
    return torch.tensor(ids, dtype=torch.long)



@torch.no_grad()
def perplexity(model: ExportedGPT, tokens: torch.Tensor, seq_length: int, batch_size: int = 8) -> dict:
    """Next-token perplexity of the whole stream ``tokens`` [N] in non-overlapping windows (module doc).

    Returns {"loss": mean loss, "ppl": exp(loss), "tokens": predictions scored (N - 1), "windows":
    how many windows (the last may be partial), "seq_length": predictions per full window}.
    """
    if tokens.numel() < 2:
        raise ConfigError("need at least two tokens to measure perplexity")
    windows = [tokens[start:start + seq_length + 1] for start in range(0, tokens.numel() - 1, seq_length)]
    total, count = 0.0, 0
    for first in range(0, len(windows), batch_size):
        batch = windows[first:first + batch_size]
        length = max(w.numel() for w in batch)
        inputs = torch.zeros(len(batch), length - 1, dtype=torch.long)
        labels = torch.zeros_like(inputs)
        mask = torch.zeros_like(inputs, dtype=torch.float32)
        for row, window in enumerate(batch):
            inputs[row, :window.numel() - 1] = window[:-1]
            labels[row, :window.numel() - 1] = window[1:]
            mask[row, :window.numel() - 1] = 1.0
        predicted = int(mask.sum())
        total += float(model.loss(inputs, labels, mask)) * predicted
        count += predicted
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count, "windows": len(windows),
            "seq_length": seq_length}


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (as Hugging Face transformers applies it); returns a new tensor.

    logits ``[..., V]`` float; seen_ids ``[..., N]`` long (the ids already in the sequence, repeats
    allowed). Each seen id's logit is divided by ``penalty`` if positive and multiplied by it if
    negative, so ``penalty > 1`` always makes a seen token less likely; 1 leaves logits unchanged.
    """
    if penalty == 1.0 or seen_ids.numel() == 0:
        return logits.clone()
    picked = logits.gather(-1, seen_ids)
    penalised = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(-1, seen_ids, penalised)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits ``[..., V]`` with every entry below the k-th largest set to -inf (ties kept); k = 0: no-op."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits.clone()
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the fewest most likely tokens whose probability sums to >= p.

    logits ``[..., V]`` -> ``[..., V]`` with the other entries set to -inf. A token is dropped
    when the tokens ranked above it already reach ``p``, so the most likely token always stays;
    p = 1: no-op.
    """
    if p >= 1.0:
        return logits.clone()
    ordered, order = logits.sort(dim=-1, descending=True)
    probs = ordered.float().softmax(dim=-1)
    drop_sorted = probs.cumsum(dim=-1) - probs >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@dataclass(frozen=True)
class Sampling:
    """How :func:`generate` picks each next token (the defaults are greedy decoding).

    ``temperature`` 0 = argmax (then top_k / top_p cannot change the choice); > 0 divides the
    logits before sampling. ``top_k`` 0 = off. ``top_p`` 1 = off. ``repetition_penalty`` 1 = off
    (> 1 discourages tokens already in the prompt or the output, e.g. 1.2; fights greedy loops).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def check(self) -> None:
        """Raise ConfigError naming the command-line flag of the first value out of range."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:  # also rejects NaN
            raise ConfigError(f"--top-p must be in (0, 1] (1 = off), got {self.top_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ConfigError(f"--repetition-penalty must be > 0 (1 = off), got {self.repetition_penalty}")


def next_token(logits: torch.Tensor, seen_ids: torch.Tensor, sampling: Sampling,
               generator: Optional[torch.Generator] = None) -> int:
    """One decoding step: logits ``[V]``, seen_ids ``[N]`` (prompt + output so far) -> the next id."""
    logits = apply_repetition_penalty(logits.float(), seen_ids, sampling.repetition_penalty)
    if sampling.temperature == 0:
        return int(logits.argmax())
    scaled = (logits - logits.max()) / sampling.temperature  # max -> 0: no overflow for tiny temperatures
    scaled = top_p_filter(top_k_filter(scaled, sampling.top_k), sampling.top_p)
    return int(torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator))


def make_generator(seed: Optional[int] = None) -> Tuple[torch.Generator, int]:
    """(a CPU torch.Generator, its seed): seeded with ``seed``, or a fresh random seed when None."""
    if seed is not None and not 0 <= seed < 2 ** 64:
        raise ConfigError(f"--seed must be in [0, 2**64), got {seed}")
    generator = torch.Generator()
    if seed is None:
        return generator, generator.seed()
    return generator.manual_seed(seed), seed


@torch.no_grad()
def generate(model: ExportedGPT, prompt_ids: List[int], max_new_tokens: int, stop_id: Optional[int] = None,
             vocab_limit: Optional[int] = None, sampling: Optional[Sampling] = None,
             generator: Optional[torch.Generator] = None) -> List[int]:
    """Continuation of ``prompt_ids``; new ids only (greedy unless ``sampling`` says otherwise).

    ``vocab_limit`` excludes padding ids; ``stop_id`` ends the output (and is its last id).
    """
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give at least one token")
    sampling = sampling or Sampling()
    sampling.check()
    ids = list(prompt_ids)
    window = model.config.max_position_embeddings
    limit = vocab_limit or model.config.vocab_size
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-window:]], dtype=torch.long)
        logits = model(context)[0, -1, :limit]
        seen = torch.tensor(ids, dtype=torch.long)
        next_id = next_token(logits, seen[seen < limit], sampling, generator)
        ids.append(next_id)
        if stop_id is not None and next_id == stop_id:
            break
    return ids[len(prompt_ids):]


def generate_text(model: ExportedGPT, tokenizer, prompt: str, max_new_tokens: int = 32,
                  sampling: Optional[Sampling] = None, seed: Optional[int] = None) -> str:
    """The prompt followed by its continuation, as one text (stops at end-of-document).

    The prompt's ids and the new ids are detokenised in one call: detokenising them apart and
    gluing the strings loses the space SentencePiece puts before a word-start piece. The prompt
    therefore appears as its tokens decode (normally the prompt itself).
    """
    prompt_ids = tokenizer.tokenize(prompt)
    new = generate(model, prompt_ids, max_new_tokens, stop_id=tokenizer.eod, vocab_limit=tokenizer.vocab_size,
                   sampling=sampling, generator=make_generator(seed)[0])
    if new and new[-1] == tokenizer.eod:
        new = new[:-1]
    return tokenizer.detokenize(prompt_ids + new)

"""Use an exported model without Megatron: perplexity of a text corpus, greedy continuation of a prompt.

    model, tokenizer = load("exported/")
    result = perplexity(model, token_stream(tokenizer, documents), seq_length=1024)
    text = generate_text(model, tokenizer, "The theory of", max_new_tokens=40)

Perplexity follows the trainer's data convention: each document is tokenised and followed by the
end-of-document id (``--append-eod``), the documents are concatenated, and the stream is cut into
consecutive windows of ``seq_length + 1`` tokens (inputs = first ``seq_length``, labels = the
next token of each); a final partial window is used as far as it goes. The result is the mean
next-token loss over all predicted tokens and its exponential.

Greedy decoding recomputes the whole (cropped) context each step: correct for every router,
including the context-dependent distilled routers, and fast enough for a reference model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, List, Optional

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
    """{"loss", "ppl", "tokens"} of next-token prediction over ``tokens`` [N] (see module doc)."""
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
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def generate(model: ExportedGPT, prompt_ids: List[int], max_new_tokens: int, stop_id: Optional[int] = None,
             vocab_limit: Optional[int] = None) -> List[int]:
    """Greedy continuation of ``prompt_ids``; new ids only. ``vocab_limit`` excludes padding ids."""
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give at least one token")
    ids = list(prompt_ids)
    window = model.config.max_position_embeddings
    limit = vocab_limit or model.config.vocab_size
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-window:]], dtype=torch.long)
        next_id = int(model(context)[0, -1, :limit].argmax())
        ids.append(next_id)
        if stop_id is not None and next_id == stop_id:
            break
    return ids[len(prompt_ids):]


def generate_text(model: ExportedGPT, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """The prompt's greedy continuation as text (stops at end-of-document)."""
    new = generate(model, tokenizer.tokenize(prompt), max_new_tokens, stop_id=tokenizer.eod,
                   vocab_limit=tokenizer.vocab_size)
    if new and new[-1] == tokenizer.eod:
        new = new[:-1]
    return tokenizer.detokenize(new)

"""Translate with the pure-torch encoder-decoder: batched greedy and beam search, BLEU and chrF.

    model, tokenizer = load_model(checkpoint="runs/mt/checkpoints")     # or exported="export/"
    hyps = translate_texts(model, tokenizer, ["<fr> Ouvrir le fichier"], Search(beam_size=5))
    scores = corpus_scores(hyps, references, langs)                       # per language + average

Decoding follows fairseq's ``SequenceGenerator``: the decoder starts from EOS; each step takes the
log-softmax of the logits (fp32; ids past the tokenizer's vocabulary, the embedding's padding
rows, get -inf); EOS is banned before ``min_len`` tokens (fairseq's default 1: no empty output);
a hypothesis has at most ``max_len = min(a * src_len + b, positions - 1)`` tokens before its EOS
(forced at that step), ``src_len`` being the sentence's source length in tokens (tag and EOS
included; fairseq takes the padded batch width, so here results do not depend on the batching).
Scores are the summed log-probabilities of the tokens and the EOS, divided by
``(tokens + 1) ** lenpen``.

* Greedy: the argmax each step; a sentence stops at its EOS.
* Beam (fairseq's): each step the ``2k`` best extensions of the ``k`` live hypotheses (at the
  first step only the first hypothesis is live); an EOS among the first ``k`` of them finishes that
  hypothesis (normalised score), the first ``k`` that are not EOS live on. A sentence is done when
  ``k`` hypotheses finished (or at ``max_len``); the best normalised score wins. Beam size 1 is
  greedy search.

Both use the model's key/value cache (:meth:`ExportedSeq2Seq.step`): each step runs the new token
only; finished sentences leave the batch. ``use_cache=False`` (greedy) re-runs the whole prefix
each step, as a reference.

Sources are tokenised as the training data was (``parallel_text``): ``tokenize(src)`` truncated to
``--encoder-seq-length - 1`` tokens, then EOS. Hypotheses are detokenised without their EOS.
Scores are sacrebleu's corpus BLEU (13a tokenisation, mixed case) and chrF of the detokenised
text, per language and averaged over the languages (the paper's Table 3 layout).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from stablemoe_megatron.errors import ConfigError
from stablemoe_megatron.export.seq2seq import ExportedSeq2Seq


@dataclass(frozen=True)
class Search:
    """Decoding settings (module docstring); ``max_len_b`` None = the model's target length - 1."""

    beam_size: int = 1
    lenpen: float = 1.0
    max_len_a: float = 0.0
    max_len_b: Optional[int] = None
    min_len: int = 1
    batch_size: int = 32

    def check(self) -> None:
        """ConfigError naming the command-line flag of the first bad value."""
        for flag, value, low in (("--beam-size", self.beam_size, 1), ("--batch-size", self.batch_size, 1),
                                 ("--min-len", self.min_len, 0)):
            if value < low:
                raise ConfigError(f"{flag} must be >= {low}, got {value}")
        if self.max_len_b is not None and self.max_len_b < 0:
            raise ConfigError(f"--max-len-b must be >= 0, got {self.max_len_b}")
        if not (math.isfinite(self.max_len_a) and self.max_len_a >= 0):
            raise ConfigError(f"--max-len-a must be a finite number >= 0, got {self.max_len_a}")
        if not math.isfinite(self.lenpen):
            raise ConfigError(f"--lenpen must be a finite number, got {self.lenpen}")


@dataclass
class Hypothesis:
    """One output: ``tokens`` (EOS excluded), ``logprob`` (sum over tokens and EOS), ``score``
    (``logprob / (len(tokens) + 1) ** lenpen``)."""

    tokens: List[int]
    score: float
    logprob: float


# -- decoding ----------------------------------------------------------------------------------------
def max_lengths(model: ExportedSeq2Seq, source_lengths: torch.Tensor, search: Search) -> torch.Tensor:
    """LongTensor [B]: most tokens before EOS per sentence (module docstring)."""
    b = search.max_len_b if search.max_len_b is not None else model.arch.target_length - 1
    lengths = (search.max_len_a * source_lengths.double() + b).long()
    if model.config.position_embedding_type == "learned_absolute":
        lengths = lengths.clamp(max=model.config.max_position_embeddings - 1)
    return lengths.clamp(min=search.min_len)


def log_probs(logits: torch.Tensor, step: int, limits: torch.Tensor, min_len: int, eos: int,
              vocab_limit: Optional[int]) -> torch.Tensor:
    """fp32 log-probabilities ``[N, V]`` of step ``step`` with fairseq's constraints (module docstring)."""
    lprobs = F.log_softmax(logits.float(), dim=-1)
    if vocab_limit is not None and vocab_limit < lprobs.shape[-1]:
        lprobs[:, vocab_limit:] = -math.inf
    if step < min_len:
        lprobs[:, eos] = -math.inf
    forced = step >= limits
    if forced.any():
        kept = lprobs[forced, eos]
        lprobs[forced] = -math.inf
        lprobs[forced, eos] = kept
    return lprobs


def _hypothesis(tokens: List[int], logprob: float, lenpen: float) -> Hypothesis:
    return Hypothesis(tokens, logprob / (len(tokens) + 1) ** lenpen, logprob)


@torch.no_grad()
def greedy_search(model: ExportedSeq2Seq, source: torch.Tensor, padding: torch.Tensor, limits: torch.Tensor,
                  search: Search, vocab_limit: Optional[int] = None, use_cache: bool = True) -> List[Hypothesis]:
    """The argmax path of each sentence; source/padding ``[B, S]``, limits ``[B]`` (:func:`max_lengths`)."""
    eos = model.eos
    memory = model.encode(source, padding)
    state = model.start(memory, padding)
    rows = torch.arange(source.shape[0], device=source.device)  # the sentence of each live row
    prefix = torch.full((source.shape[0], 1), eos, dtype=torch.long, device=source.device)
    total = torch.zeros(source.shape[0], device=source.device)
    out: List[Optional[Hypothesis]] = [None] * source.shape[0]
    step = 0
    while rows.numel():
        if use_cache:
            logits = model.step(state, prefix[:, -1:])[:, -1]
        else:  # the reference: the whole prefix again, from a fresh state
            logits = model.step(model.start(memory[rows], padding[rows]), prefix)[:, -1]
        lprobs = log_probs(logits, step, limits[rows], search.min_len, eos, vocab_limit)
        best = lprobs.argmax(dim=-1)
        total = total + lprobs.gather(1, best[:, None]).squeeze(1)
        prefix = torch.cat([prefix, best[:, None]], dim=1)
        ended = best == eos
        for i in ended.nonzero().flatten().tolist():
            out[int(rows[i])] = _hypothesis(prefix[i, 1:-1].tolist(), float(total[i]), search.lenpen)
        if ended.any():
            live = (~ended).nonzero().flatten()
            rows, prefix, total = rows[live], prefix[live], total[live]
            state = state.select(live) if use_cache else state
        step += 1
    return out


@torch.no_grad()
def beam_search(model: ExportedSeq2Seq, source: torch.Tensor, padding: torch.Tensor, limits: torch.Tensor,
                search: Search, vocab_limit: Optional[int] = None) -> List[List[Hypothesis]]:
    """fairseq's beam search (module docstring); per sentence its finished hypotheses, best first."""
    k, eos = search.beam_size, model.eos
    batch = source.shape[0]
    expand = torch.arange(batch, device=source.device).repeat_interleave(k)
    state = model.start(model.encode(source, padding), padding).select(expand)  # cross keys/values once per sentence
    sentence = torch.arange(batch, device=source.device)  # the original sentence of each live group of k rows
    tokens = torch.full((batch, k, 1), eos, dtype=torch.long, device=source.device)
    scores = torch.zeros(batch, k, device=source.device)
    scores[:, 1:] = -math.inf  # the first step extends one hypothesis only
    finished: List[List[Hypothesis]] = [[] for _ in range(batch)]
    step = 0
    while sentence.numel():
        live = sentence.numel()
        logits = model.step(state, tokens[:, :, -1].reshape(live * k, 1))[:, -1]
        lprobs = log_probs(logits, step, limits[sentence].repeat_interleave(k), search.min_len, eos, vocab_limit)
        vocab = lprobs.shape[-1]
        candidates = (scores.unsqueeze(-1) + lprobs.view(live, k, vocab)).view(live, k * vocab)
        top, index = candidates.topk(min(2 * k, k * vocab), dim=1)
        beam, token = index // vocab, index % vocab
        is_eos = (token == eos) & torch.isfinite(top)
        for group, rank in is_eos[:, :k].nonzero().tolist():
            done = finished[int(sentence[group])]
            if len(done) < k:
                done.append(_hypothesis(tokens[group, beam[group, rank], 1:].tolist(), float(top[group, rank]),
                                        search.lenpen))
        ended = torch.tensor([len(finished[int(s)]) >= k for s in sentence], device=limits.device) \
            | (step >= limits[sentence])
        keep = (~ended).nonzero().flatten()
        rank = torch.arange(top.shape[1], device=top.device) + is_eos.long() * top.shape[1]  # EOS ones last
        order = rank.argsort(dim=1)[keep, :k]
        new_beam, new_token = beam[keep].gather(1, order), token[keep].gather(1, order)
        scores = top[keep].gather(1, order).masked_fill(is_eos[keep].gather(1, order), -math.inf)
        state = state.select((keep[:, None] * k + new_beam).reshape(-1), same_sources=keep.numel() == live)
        tokens = torch.cat([tokens[keep[:, None], new_beam], new_token.unsqueeze(-1)], dim=2)
        sentence = sentence[keep]
        step += 1
    return [sorted(done, key=lambda h: -h.score) for done in finished]


def batch_sources(sources: Sequence[Sequence[int]], eos: int):
    """(ids [B, S] right-padded with EOS, padding [B, S] True at pads, lengths [B])."""
    lengths = torch.tensor([len(s) for s in sources], dtype=torch.long)
    ids = torch.full((len(sources), int(lengths.max())), eos, dtype=torch.long)
    padding = torch.ones_like(ids, dtype=torch.bool)
    for row, source in enumerate(sources):
        ids[row, :len(source)] = torch.tensor(source, dtype=torch.long)
        padding[row, :len(source)] = False
    return ids, padding, lengths


def translate_ids(model: ExportedSeq2Seq, sources: Sequence[Sequence[int]], search: Search,
                  vocab_limit: Optional[int] = None) -> List[Hypothesis]:
    """The best hypothesis of every source (EOS-terminated ids), in the given order.

    Sources are batched ``search.batch_size`` at a time, longest first (less padding).
    """
    search.check()
    if model.eos is None:
        raise ConfigError("the model's config has no tokenizer end-of-sentence id (tokenizer.eod)")
    if search.beam_size > 1 and 2 * search.beam_size > (vocab_limit or model.config.vocab_size):
        raise ConfigError(f"--beam-size {search.beam_size} needs a vocabulary of at least {2 * search.beam_size}")
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    out: List[Optional[Hypothesis]] = [None] * len(sources)
    device = model.embed_tokens.weight.device
    for first in range(0, len(order), search.batch_size):
        chunk = order[first:first + search.batch_size]
        ids, padding, lengths = batch_sources([sources[i] for i in chunk], model.eos)
        ids, padding = ids.to(device), padding.to(device)
        limits = max_lengths(model, lengths, search).to(device)
        if search.beam_size == 1:
            best = greedy_search(model, ids, padding, limits, search, vocab_limit)
        else:
            best = [hyps[0] for hyps in beam_search(model, ids, padding, limits, search, vocab_limit)]
        for index, hyp in zip(chunk, best):
            out[index] = hyp
    return out


def encode_sources(tokenizer, texts: Sequence[str], model: ExportedSeq2Seq):
    """(source ids as training saw them: tokens truncated to the source length - 1, then EOS;
    how many were truncated)."""
    length = model.arch.source_length
    if model.config.position_embedding_type == "learned_absolute":
        length = min(length, model.config.max_position_embeddings)
    tokens = [list(tokenizer.tokenize(text)) for text in texts]
    return [ids[:length - 1] + [model.eos] for ids in tokens], sum(len(ids) > length - 1 for ids in tokens)


def translate_texts(model: ExportedSeq2Seq, tokenizer, texts: Sequence[str], search: Search,
                    log: Optional[Callable[[str], None]] = None) -> List[str]:
    """Detokenised best translations of ``texts`` (each already starting with its language tag)."""
    sources, truncated = encode_sources(tokenizer, texts, model)
    if truncated and log is not None:
        log(f"{truncated} source(s) longer than the model's {model.arch.source_length} source tokens "
            f"(EOS included) were truncated, as in training")
    hyps = translate_ids(model, sources, search, vocab_limit=tokenizer.vocab_size)
    return [tokenizer.detokenize(h.tokens) for h in hyps]


# -- loading ---------------------------------------------------------------------------------------
def load_model(checkpoint=None, exported=None, stage: Optional[int] = None,
               tokenizer_files: Optional[dict] = None, dtype: Optional[torch.dtype] = None):
    """(ExportedSeq2Seq in eval mode, tokenizer) of our torch_dist ``checkpoint`` (run or iter_*
    directory; routing ``stage`` as ``convert_checkpoint export --stage``) or an ``exported`` directory."""
    from stablemoe_megatron.export.tokenizer_files import load_tokenizer

    if exported is not None:
        if stage is not None:
            raise ConfigError("--stage applies to --checkpoint: an export's routing was chosen when it was exported")
        if not Path(exported).is_dir():
            raise ConfigError(f"--exported {exported}: no such directory")
        model = ExportedSeq2Seq.from_pretrained(exported, dtype=dtype)
        return model, load_tokenizer(exported, model.config.tokenizer)
    from stablemoe_megatron.export.exporter import routing_stage
    from stablemoe_megatron.export.seq2seq_export import model_from_checkpoint, open_checkpoint

    ckpt = open_checkpoint(checkpoint)
    return model_from_checkpoint(ckpt, routing_stage(ckpt.config, ckpt.state.stage, stage), tokenizer_files, dtype)


# -- inputs and scores -----------------------------------------------------------------------------
def read_records(path, lang: Optional[str] = None, score: bool = False) -> List[dict]:
    """Records ``{"src", ...}`` of ``--input``: a .jsonl of the corpus builder's records (``lang``,
    ``src`` with its tag, ``tgt``) or plain text, one source per line (``lang`` prefixes ``<lang> ``).
    ``score``: every record needs ``lang`` and ``tgt`` (a .jsonl)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--input {path}: no such file")
    lines = [line.rstrip("\r") for line in path.read_text(encoding="utf-8").split("\n")]  # not splitlines():
    if lines and not lines[-1]:  # U+2028 and friends may occur inside a sentence (and raw in JSON strings)
        lines.pop()
    if path.suffix != ".jsonl":
        if score:
            raise ConfigError(f"--score needs a .jsonl --input with \"lang\", \"src\" and \"tgt\" per line; "
                              f"{path} is plain text")
        prefix = f"<{lang}> " if lang else ""
        return [{"src": prefix + line, **({"lang": lang} if lang else {})} for line in lines]
    if lang:
        raise ConfigError(f"--lang is for plain-text --input: the records of {path} carry their tag in \"src\"")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("src"), str):
            raise ConfigError(f"--input {path}:{number}: expected a JSON object with a \"src\" string")
        for field in ("tgt", "lang") if score else ():
            if not isinstance(record.get(field), str):
                raise ConfigError(f"--score: {path}:{number}: the record has no \"{field}\" string "
                                  f"(--score needs \"lang\", \"src\" and \"tgt\" per line)")
        records.append(record)
    return records


def corpus_scores(hyps: Sequence[str], refs: Sequence[str], langs: Sequence[str]) -> dict:
    """sacrebleu corpus BLEU and chrF per language and their mean over the languages.

    {"languages": {lang: {"bleu", "chrf", "sentences"}}, "average": {"bleu", "chrf"},
    "signatures": {"bleu", "chrf"}}.
    """
    from sacrebleu.metrics import BLEU, CHRF

    groups: Dict[str, List[int]] = {}
    for index, lang in enumerate(langs):
        groups.setdefault(lang, []).append(index)
    bleu, chrf = BLEU(), CHRF()
    per = {}
    for lang in sorted(groups):
        h, r = [hyps[i] for i in groups[lang]], [[refs[i] for i in groups[lang]]]
        per[lang] = {"bleu": bleu.corpus_score(h, r).score, "chrf": chrf.corpus_score(h, r).score,
                     "sentences": len(h)}
    average = {m: sum(v[m] for v in per.values()) / len(per) for m in ("bleu", "chrf")} if per else {}
    return {"languages": per, "average": average,
            "signatures": {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())}}


def format_scores(scores: dict) -> str:
    """The per-language table and the average row."""
    rows = [f"{'lang':<8}{'sentences':>10}{'BLEU':>8}{'chrF':>8}"]
    for lang, value in scores["languages"].items():
        rows.append(f"{lang:<8}{value['sentences']:>10}{value['bleu']:>8.2f}{value['chrf']:>8.2f}")
    if scores["average"]:
        count = sum(v["sentences"] for v in scores["languages"].values())
        rows.append(f"{'average':<8}{count:>10}{scores['average']['bleu']:>8.2f}{scores['average']['chrf']:>8.2f}")
    rows.append(f"BLEU {scores['signatures']['bleu']}; chrF {scores['signatures']['chrf']}; "
                f"average = mean over the {len(scores['languages'])} language(s)")
    return "\n".join(rows)

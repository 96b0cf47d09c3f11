"""Parallel text for translation: two megatron indexed datasets (source, target) aligned by index.

``tools/preprocess_data.py --json-keys src tgt --output-prefix P`` writes ``P_src_document`` and
``P_tgt_document`` (.bin/.idx): document i of one is the translation of document i of the other.
A translation run names the pair by ``P`` (``--data-path P``, ``--valid-data-path P``,
``--test-data-path P``); the two halves must hold the same number of documents, else a ConfigError
names both files and both counts.

A sample (fairseq's convention, with the tokenizer's end-of-document id as EOS):

* source ``x_1 .. x_n EOS`` (the corpus builder starts each source with its language tag; with
  SentencePiece the tag follows the model's word-boundary piece), truncated to ``--encoder-seq-length``
  (the EOS kept);
* decoder input ``EOS y_1 .. y_m`` and labels ``y_1 .. y_m EOS``, truncated to ``--decoder-seq-length``.

Batching as fairseq does it, so little compute goes to padding: training reads each epoch in a
seeded random order, sorts every window of ``BUCKET_BATCHES`` global batches by length, cuts the
window into global batches and shuffles their order (:class:`EpochSampler`); every micro-batch is
padded to the longest pair of its micro-step over ALL data-parallel ranks, rounded up to a multiple
of ``PAD_MULTIPLE`` and capped at the configured lengths (:class:`PaddedBatchSampler`: each rank
knows the others' samples, so all ranks pad alike and hold the same number of tokens at an MoE
layer, as the token shuffle and the all-to-alls need). Padding uses the EOS id, is masked out of
the loss, and the source padding is masked out of attention (``source_padding``). Padded positions
still pass through the MoE layers like any token.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from stablemoe_megatron.data_integrity import check_indexed_dataset
from stablemoe_megatron.errors import ConfigError

SOURCE_KEY, TARGET_KEY = "src", "tgt"
PREPROCESS_HINT = ("make the pair with tools/preprocess_data.py --json-keys src tgt --output-prefix PREFIX "
                   "(no --append-eod), then pass PREFIX")
FLAGS = ("--data-path", "--valid-data-path", "--test-data-path")
BUCKET_BATCHES = 50  # global batches per length-sorted window
PAD_MULTIPLE = 8


def pair_prefixes(prefix: str) -> Tuple[str, str]:
    """(source prefix, target prefix) of a parallel-text PREFIX."""
    return f"{prefix}_{SOURCE_KEY}_document", f"{prefix}_{TARGET_KEY}_document"


def _prefix_of(paths: List[str], flag: str) -> Optional[str]:
    if not paths:
        return None
    if len(paths) != 1:
        raise ConfigError(f"{flag} {' '.join(paths)}: translation takes one parallel-text PREFIX (no blend "
                          f"weights); {PREPROCESS_HINT}")
    return paths[0]


def prefixes(data) -> Dict[str, Optional[str]]:
    """{flag: PREFIX or None} of --data-path / --valid-data-path / --test-data-path."""
    return {flag: _prefix_of(paths, flag) for flag, paths in
            zip(FLAGS, (data.data_path, data.valid_data_path, data.test_data_path))}


def check_parallel_data(data, require_train: bool = True) -> Dict[str, int]:
    """Both halves of every given pair exist, are well-formed and hold equal counts; {flag: pairs}."""
    if data.mock_data:
        raise ConfigError("--mock-data makes GPT samples; --model-family encoder_decoder trains on parallel "
                          f"text: drop --mock-data and give --data-path PREFIX ({PREPROCESS_HINT})")
    found = prefixes(data)
    if found["--data-path"] is None and require_train:
        raise ConfigError(f"--data-path is required: the PREFIX of a parallel-text pair; {PREPROCESS_HINT}")
    counts = {}
    for flag, prefix in found.items():
        if prefix is None:
            continue
        sizes = []
        for half in pair_prefixes(prefix):
            for suffix in (".bin", ".idx"):
                if not os.path.isfile(half + suffix):
                    raise ConfigError(f"{flag} {prefix}: {half + suffix} does not exist; {PREPROCESS_HINT}")
            sizes.append(check_indexed_dataset(half, flag))
        if sizes[0] != sizes[1]:
            src, tgt = pair_prefixes(prefix)
            raise ConfigError(f"{flag} {prefix}: {src}.idx holds {sizes[0]} sentences but {tgt}.idx holds "
                              f"{sizes[1]}: the two sides are not aligned; re-run preprocess_data on the "
                              f"parallel .jsonl with --json-keys src tgt")
        counts[flag] = sizes[0]
    return counts


def check_token_range(data, vocab_size: int) -> None:
    """ConfigError if a token id of any half is outside ``[0, vocab_size)``."""
    from stablemoe_megatron import data as data_lib

    for flag, prefix in prefixes(data).items():
        for half in pair_prefixes(prefix) if prefix else ():
            ds = data_lib._indexed(half)
            data_lib._check_ids(data_lib._tokens(ds), vocab_size, flag, half)


class ParallelTextDataset(torch.utils.data.Dataset):
    """Sample i of a pair as numpy arrays (module docstring): ``source`` (EOS-terminated,
    truncated) and ``target`` (the target ids, truncated so that target + EOS fits)."""

    def __init__(self, prefix: str, source_length: int, target_length: int, eos_id: int):
        from stablemoe_megatron import data as data_lib

        self.prefix = prefix
        self.source, self.target = (data_lib._indexed(half) for half in pair_prefixes(prefix))
        if len(self.source) != len(self.target):
            raise ConfigError(f"{prefix}: {len(self.source)} source but {len(self.target)} target sentences")
        self.source_length, self.target_length, self.eos_id = source_length, target_length, eos_id

    def __len__(self) -> int:
        return len(self.source)

    def lengths_by_sample(self):
        """As :meth:`EpochSampler.lengths_by_sample`, in corpus order (validation, test)."""
        sources, targets = self.lengths()
        return (lambda idx: sources[idx]), (lambda idx: targets[idx]), (self.source_length, self.target_length)

    def lengths(self) -> Tuple[np.ndarray, np.ndarray]:
        """(source, target) lengths of every sample as the model sees them: source + EOS and EOS +
        target (= target + EOS), capped at the configured lengths; int64 [N] each."""
        source = np.minimum(np.asarray(self.source.sequence_lengths, dtype=np.int64) + 1, self.source_length)
        target = np.minimum(np.asarray(self.target.sequence_lengths, dtype=np.int64) + 1, self.target_length)
        return source, target

    def __getitem__(self, index: int) -> dict:
        source = np.asarray(self.source[index], dtype=np.int64)[: self.source_length - 1]
        target = np.asarray(self.target[index], dtype=np.int64)[: self.target_length - 1]
        return {"source": np.append(source, self.eos_id), "target": target}


class Collator:
    """Pads samples to [B, S] / [B, T] micro-batch tensors (module docstring); picklable for workers.
    S and T are the micro-step's padded lengths (each sample carries them), else the configured ones."""

    def __init__(self, source_length: int, target_length: int, eos_id: int):
        self.source_length, self.target_length, self.eos_id = source_length, target_length, eos_id

    def __call__(self, samples: List[dict]) -> Dict[str, torch.Tensor]:
        batch = len(samples)
        src_len, tgt_len = samples[0].get("pad", (self.source_length, self.target_length))
        source = torch.full((batch, src_len), self.eos_id, dtype=torch.long)
        padding = torch.ones((batch, src_len), dtype=torch.bool)
        target_input = torch.full((batch, tgt_len), self.eos_id, dtype=torch.long)
        labels = torch.full((batch, tgt_len), self.eos_id, dtype=torch.long)
        loss_mask = torch.zeros((batch, tgt_len), dtype=torch.float32)
        for row, sample in enumerate(samples):
            src, tgt = torch.from_numpy(sample["source"]), torch.from_numpy(sample["target"])
            source[row, :len(src)] = src
            padding[row, :len(src)] = False
            target_input[row, 1:len(tgt) + 1] = tgt  # EOS y_1 .. y_m
            labels[row, :len(tgt)] = tgt              # y_1 .. y_m EOS
            loss_mask[row, :len(tgt) + 1] = 1.0
        return {"source": source, "source_padding": padding, "target_input": target_input,
                "labels": labels, "loss_mask": loss_mask}


def _round_up(value: int, multiple: int, cap: int) -> int:
    return min(cap, -(-int(value) // multiple) * multiple)


class PaddedBatchSampler:
    """Megatron's pretraining batch sampler (:class:`~stablemoe_megatron.data.MegatronPretrainingBatchSampler`:
    resumes at ``consumed_samples``), yielding ``(index, source pad, target pad)`` per sample: the
    longest pair of the whole micro-step (every DP rank's slice), rounded up (module docstring)."""

    def __init__(self, dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 total_samples: int):
        from stablemoe_megatron.data import MegatronPretrainingBatchSampler

        self.inner = MegatronPretrainingBatchSampler(total_samples, consumed_samples, micro_batch_size, dp_rank, dp_size)
        self.dataset, self.mbs, self.rank = dataset, micro_batch_size, dp_rank

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        src_lengths, tgt_lengths, caps = self.dataset.lengths_by_sample()
        for indices in self.inner:
            first = indices[0] - self.rank * self.mbs
            step = np.arange(first, first + self.inner.chunk)
            pad = (_round_up(src_lengths(step).max(), PAD_MULTIPLE, caps[0]),
                   _round_up(tgt_lengths(step).max(), PAD_MULTIPLE, caps[1]))
            yield [(index, *pad) for index in indices]


class _Padded(torch.utils.data.Dataset):
    """A dataset read by :class:`PaddedBatchSampler`'s ``(index, S, T)`` items."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item) -> dict:
        index, src_len, tgt_len = item
        return dict(self.dataset[index], pad=(src_len, tgt_len))


def micro_batches(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                  dp_size: int, num_workers: int = 0, total_samples: Optional[int] = None):
    """This DP rank's micro-batches from sample ``consumed_samples`` on (Megatron's pretraining
    batch sampler over ``dataset``'s order; padded per micro-step, see the module docstring)."""
    total = len(dataset) if total_samples is None else min(int(total_samples), len(dataset))
    sampler = PaddedBatchSampler(dataset, consumed_samples, micro_batch_size, dp_rank, dp_size, total)
    dataset = _Padded(dataset)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=False,
        # its own generator: a DataLoader iterator draws a seed from the global RNG when it starts, which
        # shifted the dropout stream of a resumed run (created at the resume, not at iteration 0)
        generator=torch.Generator().manual_seed(0),
        persistent_workers=num_workers > 0,
        collate_fn=Collator(dataset.dataset.source_length, dataset.dataset.target_length, dataset.dataset.eos_id))
    return iter(loader)


class EpochSampler(torch.utils.data.Dataset):
    """Training samples over several epochs, length-bucketed (module docstring): index i -> pair
    ``order_e[i mod n]`` of epoch e = i // n. ``order_e``: a permutation seeded by (seed, e), each
    window of ``BUCKET_BATCHES`` global batches sorted by length (stable), cut into global batches
    whose order within the window is shuffled. Deterministic, so a resumed run reads the same order."""

    def __init__(self, dataset: ParallelTextDataset, num_samples: int, seed: int, global_batch: int):
        self.dataset, self.num_samples, self.seed, self.global_batch = dataset, int(num_samples), int(seed), global_batch
        self.source_length, self.target_length, self.eos_id = \
            dataset.source_length, dataset.target_length, dataset.eos_id
        self._sources, self._targets = dataset.lengths()
        self._orders: Dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def order(self, epoch: int) -> np.ndarray:
        """[n] the pairs of ``epoch`` in reading order."""
        if epoch not in self._orders:
            rng = np.random.RandomState((self.seed * 1000003 + epoch) % (2 ** 32))
            perm = rng.permutation(len(self.dataset))
            size = self.global_batch * BUCKET_BATCHES
            parts = []
            for start in range(0, len(perm), size):
                window = perm[start:start + size]
                window = window[np.argsort(self._sources[window] + self._targets[window], kind="stable")]
                batches = [window[i:i + self.global_batch] for i in range(0, len(window), self.global_batch)]
                parts.extend(batches[j] for j in rng.permutation(len(batches)))
            self._orders = {epoch: np.concatenate(parts)}  # one epoch at a time
        return self._orders[epoch]

    def pair_index(self, index: int) -> int:
        epoch, offset = divmod(int(index), len(self.dataset))
        return int(self.order(epoch)[offset])

    def lengths_by_sample(self):
        """(source lengths of sample indices, target lengths of sample indices, (S cap, T cap))."""
        pick = np.vectorize(self.pair_index, otypes=[np.int64])
        return (lambda idx: self._sources[pick(idx)]), (lambda idx: self._targets[pick(idx)]), \
            (self.source_length, self.target_length)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.pair_index(index)]


def build_datasets(config, eos_id: int, num_train_samples: int, global_batch: int = 1):
    """(train, valid, test) datasets of a translation run (None where no prefix was given)."""
    found = prefixes(config.data)
    model = config.model
    made = {flag: ParallelTextDataset(prefix, model.source_length, model.target_length, eos_id)
            if prefix else None for flag, prefix in found.items()}
    train = made["--data-path"]
    if train is not None and num_train_samples:
        train = EpochSampler(train, num_train_samples, config.training.seed, global_batch)
    return train, made["--valid-data-path"], made["--test-data-path"]


def probe_pairs(config, num_tokens: int, eos_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Routing-probe inputs of a translation run: (sources [n, L], decoder inputs [n, L]), LongTensors.

    Validation pairs (``--valid-data-path``) whose source + EOS and EOS + target both reach L
    tokens, cut to exactly L (no padding, so every probed position is a real token); L is the
    longest of 16, 12, 8, 4 with enough such pairs for ``num_tokens`` tokens per MoE layer. The
    pairs are chosen by ``--seed`` (the same on every rank and across resumes), in corpus order.
    Both stacks' MoE layers see n * L tokens: the encoder's the sources, the decoder's the inputs.
    """
    prefix = prefixes(config.data)["--valid-data-path"]
    if prefix is None:
        raise ConfigError("--routing-probe-interval of an encoder_decoder run probes validation pairs: "
                          "give --valid-data-path PREFIX (or drop --routing-probe-interval)")
    dataset = ParallelTextDataset(prefix, 1 << 30, 1 << 30, eos_id)
    source_lengths = np.asarray(dataset.source.sequence_lengths) + 1
    target_lengths = np.asarray(dataset.target.sequence_lengths) + 1
    for length in (16, 12, 8, 4):
        count = -(-num_tokens // length)
        eligible = np.flatnonzero((source_lengths >= length) & (target_lengths >= length))
        if len(eligible) >= count:
            break
    else:
        raise ConfigError(f"--routing-probe-tokens {num_tokens}: --valid-data-path {prefix} has only "
                          f"{len(eligible)} pairs of at least 4 tokens per side; lower --routing-probe-tokens")
    chosen = np.sort(np.random.RandomState(config.training.seed).choice(eligible, count, replace=False))
    sources, targets = [], []
    for index in chosen:
        sample = dataset[int(index)]
        sources.append(sample["source"][:length])
        targets.append(np.concatenate([[eos_id], sample["target"]])[:length])
    return torch.as_tensor(np.stack(sources)), torch.as_tensor(np.stack(targets))

"""Training data: checks, megatron-core GPT datasets, resumable micro-batch iterators, token statistics.

The trainer calls, in order: :func:`check_data_paths`, :func:`tokenizer_from_config`,
:func:`check_token_range` (all before torch.distributed exists), then :func:`build_datasets` on
every rank and :func:`micro_batches` per split. :func:`token_counts` feeds the frequency-balanced
hash router; :func:`probe_tokens` gives the held-out sequences of the routing-fluctuation probe.

Choices, each for a reason:

* ``--data-path`` is Megatron's blend syntax: ``PREFIX [PREFIX ...]`` or ``W1 PREFIX1 W2 PREFIX2 ...``
  (entries may also hold several whitespace-separated items, as a YAML string would). A list without
  weights is blended in proportion to the datasets' sizes for ONE pass (Megatron-LM's rule), so
  :func:`build_datasets` raises a ConfigError when that is shorter than the run needs.
* ``--valid-data-path`` / ``--test-data-path`` replace only that part of ``--split``: the train part
  (and the other part) still come from ``--data-path`` split by ``--split``; the replaced part's
  documents are simply unused (use e.g. ``--split 100,0,0`` to train on all of ``--data-path``).
* Index cache: megatron caches each dataset's shuffle/sample indices as ``.npy`` files named by a
  hash of everything they depend on. They go to ``--data-cache-path``, else to ``.cache/`` in the
  directory of the first ``--data-path`` prefix. That directory must be writable (a read-only data
  directory needs ``--data-cache-path``; checked up front, ConfigError) and, as in Megatron-LM,
  visible to every rank: rank 0 builds the indices, then (barrier) the other ranks load them.
* Sample counts follow Megatron-LM: train = train_iters * global_batch, valid =
  (train_iters // eval_interval + 1) * eval_iters * global_batch, test = eval_iters * global_batch.
* Validation restarts at sample 0 at every evaluation (the trainer calls ``micro_batches(valid, 0,
  ...)``): every evaluation scores the same held-out samples, so validation losses are comparable
  over the run. (Megatron-LM instead advances through the validation set; the sizes above cover
  both.) :func:`eval_micro_batches` takes a start offset and a sample count for either policy.
* A split part that gets zero documents makes megatron's index builder loop forever, so every
  used part is checked against the document counts first (ConfigError naming ``--split``).
* ``--mock-data`` (Megatron-LM's flag) trains on megatron-core's ``MockGPTDataset``, built by the same
  ``BlendedMegatronDatasetBuilder`` from a ``GPTDatasetConfig`` without a blend, as Megatron-LM's
  ``pretrain_gpt.py`` does. Its 100,000 documents are fixed (megatron's own RNG, seed 0: lengths
  uniform in [1, 4096); document ``i`` is the ids ``1, 2, ..., L_i - 1`` modulo the tokenizer's
  vocabulary, then the end-of-document id); ``--seed`` only shuffles the samples. megatron-core splits
  them 1:1:1 into train/valid/test and ignores ``--split``. No index cache is written unless
  ``--data-cache-path`` is given (every rank builds the indices in memory, about a second on a CPU).
  The token counts of the hash router and the routing probe's held-out tokens come from these
  documents too.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from stablemoe_megatron.data_integrity import check_indexed_dataset
from stablemoe_megatron.errors import ConfigError

SCAN_LIMIT_BYTES = 512 * 2**20  # check_token_range reads at most this much of each .bin
COUNT_CHUNK_TOKENS = 2**24  # token_counts' bincount chunk (bounds its int64 temporary to 128 MiB)
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
SPLIT_NAMES = ("train", "valid", "test")
PREPROCESS_HINT = "create it with tools/preprocess_data.py (stablemoe-preprocess-data)"
MOCK_SPLIT = "1,1,1"  # megatron-core's split of mock data (BlendedMegatronDatasetConfig, whatever --split says)

Blend = Tuple[List[str], Optional[List[float]]]


def _megatron_datasets():
    """Import megatron-core's dataset modules lazily, hiding their optional-package import warnings."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        from megatron.core.datasets import blended_megatron_dataset_builder as builder
        from megatron.core.datasets import gpt_dataset, indexed_dataset
    return builder, gpt_dataset, indexed_dataset


# -- --data-path blends --------------------------------------------------------------------------


def _is_number(text: str) -> bool:
    return re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", text) is not None


def parse_blend(entries: Sequence[str], flag: str = "--data-path") -> Optional[Blend]:
    """``[PREFIX ...]`` or ``[W1, PREFIX1, W2, PREFIX2 ...]`` -> ``(prefixes, weights or None)``; None if empty.

    A single weighted prefix drops its weight (same data). Weights must be positive numbers.
    """
    items = [item for entry in entries for item in str(entry).split()]
    if not items:
        return None
    if not _is_number(items[0]):
        return items, None
    usage = f"{flag}: expected PREFIX [PREFIX ...] or W1 PREFIX1 W2 PREFIX2 ... (weights > 0), got {' '.join(items)!r}"
    if len(items) % 2 or not all(_is_number(w) for w in items[0::2]):
        raise ConfigError(usage)
    weights = [float(w) for w in items[0::2]]
    if any(w <= 0 for w in weights):
        raise ConfigError(usage)
    prefixes = items[1::2]
    return (prefixes, None) if len(prefixes) == 1 else (prefixes, weights)


def _blends(data) -> Dict[str, Optional[Blend]]:
    """The parsed blend of each data flag (None when the flag is empty)."""
    return {
        "--data-path": parse_blend(data.data_path, "--data-path"),
        "--valid-data-path": parse_blend(data.valid_data_path, "--valid-data-path"),
        "--test-data-path": parse_blend(data.test_data_path, "--test-data-path"),
    }


def check_data_paths(data) -> None:
    """Every prefix of --data-path / --valid-data-path / --test-data-path has its .bin and .idx file,
    well formed and consistent (:func:`~stablemoe_megatron.data_integrity.check_indexed_dataset`).
    With --mock-data: no data path at all (megatron-core builds every split of the mock data)."""
    if data.mock_data:
        for flag, paths in (("--data-path", data.data_path), ("--valid-data-path", data.valid_data_path),
                            ("--test-data-path", data.test_data_path)):
            if paths:
                raise ConfigError(f"--mock-data trains on synthetic tokens: drop {flag} (or --mock-data)")
        return
    blends = _blends(data)
    if blends["--data-path"] is None:
        raise ConfigError(f"--data-path is required: the PREFIX of a .bin/.idx dataset; {PREPROCESS_HINT}")
    for flag, blend in blends.items():
        for prefix in (blend[0] if blend else []):
            for suffix in (".bin", ".idx"):
                if not os.path.isfile(prefix + suffix):
                    hint = ""
                    if prefix.endswith((".bin", ".idx")):
                        hint = " (give the prefix without .bin/.idx)"
                    elif os.path.isfile(prefix + "_text_document" + suffix):
                        hint = f" (did you mean {prefix}_text_document?)"
                    raise ConfigError(f"{flag} {prefix}: {prefix + suffix} does not exist{hint}; "
                                      f"{PREPROCESS_HINT}")
            check_indexed_dataset(prefix, flag)


# -- Tokenizer -----------------------------------------------------------------------------------


class MegatronTokenizerAdapter:
    """The project tokenizer with the attributes megatron's GPTDataset reads from ``config.tokenizer``.

    ``pad`` is -1: our tokenizers have no pad id, and megatron masks ``labels == pad``; -1 never
    occurs in the data. ``unique_identifiers`` enters megatron's cache hash; the indices depend
    only on document lengths, so the tokenizer's type, vocab size and eod identify it enough.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = int(tokenizer.vocab_size)
        self.eod = int(tokenizer.eod)
        self.pad = -1
        self.unique_identifiers = OrderedDict(
            [("class", "StableMoETokenizer"), ("tokenizer_type", getattr(tokenizer, "tokenizer_type", "")),
             ("vocab_size", self.vocab_size), ("eod", self.eod)])

    def tokenize(self, text: str) -> List[int]:
        return self.tokenizer.tokenize(text)

    def detokenize(self, ids) -> str:
        return self.tokenizer.detokenize(ids)


def tokenizer_from_config(data):
    """The project tokenizer from --tokenizer-type/--tokenizer-model/--vocab-file/--merge-file/--vocab-size."""
    from stablemoe_megatron.tokenizer import build_tokenizer

    return build_tokenizer(data.tokenizer_type, data.tokenizer_model, data.vocab_file, data.merge_file,
                           data.vocab_size)


def tokenizer_flags(data) -> str:
    """The flags that chose the tokenizer, as typed (for messages), e.g. ``--tokenizer-model a.model``."""
    if data.tokenizer_type == "NullTokenizer":
        return f"--tokenizer-type NullTokenizer --vocab-size {data.vocab_size}"
    if data.tokenizer_type == "GPT2BPETokenizer":
        return f"--vocab-file {data.vocab_file} --merge-file {data.merge_file}"
    return f"--tokenizer-model {data.tokenizer_model}"


# -- Token arrays: range check and counts --------------------------------------------------------


def _indexed(prefix: str):
    """megatron's IndexedDataset for ``prefix`` (memmapped; reads only the .idx header eagerly).

    Keep it referenced while using its ``index`` arrays: they view an mmap its ``__del__`` closes.
    """
    return _megatron_datasets()[2].IndexedDataset(prefix, mmap=True)


def _document_lengths(prefix: str) -> np.ndarray:
    """Tokens per document of ``prefix``, int32 [documents] (a copy, independent of the mmap)."""
    ds = _indexed(prefix)
    return np.array(ds.index.sequence_lengths)


def _tokens(ds, begin: int = 0, end: Optional[int] = None) -> np.ndarray:
    """Memmapped token ids of documents ``[begin, end)`` of an IndexedDataset, shape [tokens] (contiguous)."""
    index = ds.index
    end = len(index.sequence_lengths) if end is None else end
    itemsize = np.dtype(index.dtype).itemsize
    if end <= begin:
        return np.zeros(0, dtype=index.dtype)
    first = int(index.sequence_pointers[begin]) // itemsize
    last = int(index.sequence_pointers[end - 1]) // itemsize + int(index.sequence_lengths[end - 1])
    return np.memmap(ds.path_prefix + ".bin", dtype=index.dtype, mode="r", offset=first * itemsize,
                     shape=(last - first,))


def _check_ids(tokens: np.ndarray, vocab_size: int, flag: str, prefix: str) -> None:
    """ConfigError if an id in ``tokens`` is outside ``[0, vocab_size)`` (numpy min/max, no copy)."""
    if tokens.size == 0:
        return
    high, low = int(tokens.max()), int(tokens.min())
    if high >= vocab_size or low < 0:
        raise ConfigError(f"{flag} {prefix}: token id {high if high >= vocab_size else low} is outside "
                          f"[0, {vocab_size}): the data was tokenized with a larger vocabulary than the "
                          f"tokenizer's {vocab_size} ids: re-run preprocess_data with the same tokenizer")


def check_token_range(data, vocab_size: int) -> None:
    """ConfigError if a token id in any data/valid/test prefix is outside ``[0, vocab_size)``.

    Reads the memmapped token array with numpy min/max. For a .bin file larger than 512 MiB only
    its first 512 MiB are scanned (a wrong tokenizer shows up in any large sample of the data).
    """
    for flag, blend in _blends(data).items():
        for prefix in (blend[0] if blend else []):
            ds = _indexed(prefix)
            tokens = _tokens(ds)
            _check_ids(tokens[: SCAN_LIMIT_BYTES // tokens.itemsize], vocab_size, flag, prefix)


def token_counts(data, vocab_size: int) -> torch.Tensor:
    """Counts of every token id in the training data, LongTensor [vocab_size] (for the hash router).

    Counts the train part (``--split``) of every ``--data-path`` prefix. With a weighted blend each
    prefix's counts are rescaled to the blend's share (expected counts, rounded), because that is the
    distribution training sees; an unweighted list is counted as is.
    """
    if data.mock_data:
        return torch.from_numpy(_mock_token_counts(data, vocab_size))
    prefixes, weights = parse_blend(data.data_path) or ([], None)
    bookend = _split_matrix(data.split)[0]
    per_prefix = []
    for prefix in prefixes:
        ds = _indexed(prefix)
        begin, end = _document_range(len(ds.index.sequence_lengths), bookend)
        tokens, counts = _tokens(ds, begin, end), np.zeros(vocab_size, dtype=np.int64)
        for start in range(0, tokens.size, COUNT_CHUNK_TOKENS):
            chunk = np.asarray(tokens[start:start + COUNT_CHUNK_TOKENS])
            _check_ids(chunk, vocab_size, "--data-path", prefix)
            counts += np.bincount(chunk, minlength=vocab_size)
        per_prefix.append(counts)
    if not per_prefix:
        raise ConfigError(f"--data-path is required to count token frequencies; {PREPROCESS_HINT}")
    if weights is None:
        return torch.from_numpy(np.sum(per_prefix, axis=0))
    total = float(sum(int(c.sum()) for c in per_prefix))
    shares = np.asarray(weights, dtype=np.float64) / sum(weights)
    expected = sum(c * (share * total / max(int(c.sum()), 1)) for c, share in zip(per_prefix, shares))
    return torch.from_numpy(np.rint(expected).astype(np.int64))


# -- Mock data -----------------------------------------------------------------------------------


def _mock_documents(data, part: int) -> Tuple[object, int, int]:
    """(megatron-core's MockGPTLowLevelDataset for the configured tokenizer, first, end document of
    split ``part``): the documents MockGPTDataset draws from, split as megatron-core splits them."""
    low = _megatron_datasets()[1].MockGPTLowLevelDataset(MegatronTokenizerAdapter(tokenizer_from_config(data)))
    return (low, *_document_range(len(low), _split_matrix(MOCK_SPLIT)[part]))


def _mock_token_counts(data, vocab_size: int) -> np.ndarray:
    """Counts of every id in the mock train documents, int64 [vocab_size], computed from their lengths.

    Document ``i`` holds ``(1, 2, ..., n_i) mod V`` (``n_i = L_i - 1``) and then the eod id: every id gets
    ``n_i // V`` and the ids ``1 .. n_i mod V`` one more, summed here with a difference array.
    """
    low, begin, end = _mock_documents(data, 0)
    n = np.asarray(low.sequence_lengths[begin:end], dtype=np.int64) - 1
    v = int(low.vocab_size)
    if v > vocab_size:
        raise ConfigError(f"--mock-data: the tokenizer's {v} ids do not fit the model's {vocab_size}")
    rest = n % v
    diff = np.bincount(rest + 1, minlength=v + 1)[: v + 1] * -1
    diff[1] += len(rest)  # +1 from id 1 up to id rest_i, for every document
    counts = np.zeros(vocab_size, dtype=np.int64)
    counts[:v] = int((n // v).sum()) + np.cumsum(diff)[:v]
    counts[int(low.eod_token)] += len(n)
    return counts


def _mock_validation_stream(data, tokens_needed: int) -> np.ndarray:
    """The first mock validation documents, concatenated, with at least ``tokens_needed`` tokens if the
    part has them (all of them would be ~68M tokens; the probe needs a few thousand)."""
    low, begin, end = _mock_documents(data, 1)
    parts, total = [], 0
    for index in range(begin, end):
        if total >= tokens_needed:
            break
        parts.append(np.asarray(low[index]))
        total += len(parts[-1])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# -- Splits --------------------------------------------------------------------------------------


def _split_matrix(split: str) -> List[Optional[Tuple[float, float]]]:
    """--split "969,30,1" -> megatron's book-ends per part, e.g. [(0, .969), (.969, .999), (.999, 1)].

    Validated here (megatron would silently drop a minus sign or divide by zero), then computed
    with megatron's own functions so the document ranges match its builder's exactly.
    """
    usage = f"--split {split!r}: expected up to three non-negative numbers with a positive sum, e.g. 969,30,1"
    if not re.fullmatch(r"\s*(\d+\.?\d*|\.\d+)(\s*[,/]\s*(\d+\.?\d*|\.\d+)){0,2}\s*", split or ""):
        raise ConfigError(usage)
    if sum(float(p) for p in re.split(r"[,/]", split)) <= 0:
        raise ConfigError(usage)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import blended_megatron_dataset_config as bmdc
    return bmdc.convert_split_vector_to_split_matrix(bmdc.parse_and_normalize_split(split))


def _document_range(num_documents: int, bookend) -> Tuple[int, int]:
    """Documents ``[begin, end)`` of a split part, rounded exactly as megatron's builder does."""
    if bookend is None:
        return 0, 0
    return int(round(bookend[0] * float(num_documents))), int(round(bookend[1] * float(num_documents)))


def check_splits(data, require_train: bool = True) -> None:
    """Every split part that will be built gets at least one document with tokens, on every prefix.

    Parts replaced by --valid-data-path/--test-data-path are not built from --data-path; those
    prefixes must hold tokens themselves. Megatron's index builder never ends on an empty part.
    """
    blends = _blends(data)
    matrix = _split_matrix(data.split)
    if require_train and matrix[0] is None:
        raise ConfigError(f"--split {data.split}: the train part is 0; give it a share, e.g. 969,30,1")
    replaced = {1: blends["--valid-data-path"] is not None, 2: blends["--test-data-path"] is not None}
    if blends["--data-path"] is None:
        raise ConfigError(f"--data-path is required: the PREFIX of a .bin/.idx dataset; {PREPROCESS_HINT}")
    for prefix in blends["--data-path"][0]:
        lengths = _document_lengths(prefix)
        for part, bookend in enumerate(matrix):
            if bookend is None or replaced.get(part):
                continue
            begin, end = _document_range(len(lengths), bookend)
            if end <= begin or int(lengths[begin:end].sum()) == 0:
                alt = f" or pass --{SPLIT_NAMES[part]}-data-path" if part else ""
                raise ConfigError(
                    f"--split {data.split}: the {SPLIT_NAMES[part]} part gets {end - begin} of the {len(lengths)} "
                    f"documents of {prefix} (no tokens); give it a larger share, set it to 0{alt}")
    for flag in ("--valid-data-path", "--test-data-path"):
        for prefix in (blends[flag][0] if blends[flag] else []):
            if int(_document_lengths(prefix).sum()) == 0:
                raise ConfigError(f"{flag} {prefix}: the dataset holds no tokens; {PREPROCESS_HINT}")


# -- Building the datasets -----------------------------------------------------------------------


def sample_counts(config, world_size: int) -> Tuple[int, int, int]:
    """(train, valid, test) samples to build, as Megatron-LM computes them (see the module docstring)."""
    t = config.training
    if t.eval_interval < 1:
        raise ConfigError(f"--eval-interval {t.eval_interval}: must be >= 1")
    if t.eval_iters < 0:
        raise ConfigError(f"--eval-iters {t.eval_iters}: must be >= 0")
    gbs = config.global_batch(world_size)
    return (t.train_iters * gbs, (t.train_iters // t.eval_interval + 1) * t.eval_iters * gbs,
            t.eval_iters * gbs)


def cache_dir(data) -> str:
    """Where megatron's index caches go: --data-cache-path, else ``.cache/`` beside the first --data-path prefix.

    Created if needed; ConfigError (naming --data-cache-path) if it cannot be written.
    """
    path = data.data_cache_path
    if not path:
        first = parse_blend(data.data_path)[0][0]
        path = os.path.join(os.path.dirname(os.path.abspath(first)), ".cache")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--data-cache-path: cannot create the dataset index cache {path} ({exc.strerror}); "
                          "pass --data-cache-path DIR, a writable directory every rank can read") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"--data-cache-path: the dataset index cache {path} is not writable; "
                          "pass --data-cache-path DIR, a writable directory every rank can read")
    return path


@contextlib.contextmanager
def _rank_zero_without_distributed():
    """Make ``torch.distributed.get_rank()`` return 0 while no process group exists.

    megatron-core 0.16's ``BlendedDataset._build_indices`` calls ``get_rank()`` on a cache miss
    without checking ``is_initialized()`` (GPTDataset does check), so a single process could not
    build a blend. Only used when torch.distributed is not initialised; restored on exit.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = original


def _gpt_config(config, tokenizer, path_to_cache: str, **blend_kwargs):
    gpt_dataset = _megatron_datasets()[1]
    return gpt_dataset.GPTDatasetConfig(
        random_seed=config.training.seed, sequence_length=config.model.seq_length,
        tokenizer=tokenizer, path_to_cache=path_to_cache, mmap_bin_files=True,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, **blend_kwargs)


def _run_builder(gpt_config, sizes: List[int]) -> list:
    builder_mod, gpt_dataset, _ = _megatron_datasets()
    cls = gpt_dataset.MockGPTDataset if gpt_config.mock else gpt_dataset.GPTDataset
    builder = builder_mod.BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, gpt_config)
    with _rank_zero_without_distributed():
        return builder.build()


def build_datasets(config, tokenizer, world_size: int, require_train: bool = True,
                   full_eval: bool = False) -> tuple:
    """(train, valid, test) megatron GPTDatasets (BlendedDatasets for blends; None for an absent part).

    Call on every rank of an initialised torch.distributed world (megatron's builder lets rank 0
    build and cache the indices, then the others load them, with barriers in between: so all ranks
    must call it), or in a single process without torch.distributed. ``--data-path`` is split by
    ``--split``; parts replaced by ``--valid-data-path``/``--test-data-path`` are built from those.
    ``full_eval`` builds the valid and test parts as exactly one epoch (every sample once).
    """
    data = config.data
    if not data.mock_data:
        check_splits(data, require_train)
    sizes = list(sample_counts(config, world_size))
    if full_eval:
        sizes[1] = sizes[2] = None  # megatron builds a part of size None as exactly one epoch
    if not hasattr(tokenizer, "unique_identifiers"):
        tokenizer = MegatronTokenizerAdapter(tokenizer)
    eval_needed = 0 if full_eval else config.training.eval_iters * config.global_batch(world_size)
    if data.mock_data:  # no blend: megatron-core sets mock=True and splits 1,1,1 (see the module docstring)
        gpt_config = _gpt_config(config, tokenizer, cache_dir(data) if data.data_cache_path else None)
        datasets = _run_builder(gpt_config, sizes)
        _check_lengths(datasets, sizes, eval_needed)
        return tuple(datasets)
    blends, path = _blends(data), cache_dir(data)
    replaced = [False, blends["--valid-data-path"] is not None, blends["--test-data-path"] is not None]
    gpt_config = _gpt_config(config, tokenizer, path, blend=blends["--data-path"], split=data.split)
    # Parts replaced by separate paths are not built from --data-path (megatron has no option for a
    # partial blend_per_split): blank them in the split matrix, keeping the other parts' book-ends.
    gpt_config.split_matrix = [None if r else b for r, b in zip(replaced, gpt_config.split_matrix)]
    datasets = _run_builder(gpt_config, [0 if r else s for r, s in zip(replaced, sizes)])
    if any(replaced):
        per_split = [None, blends["--valid-data-path"], blends["--test-data-path"]]
        separate = _run_builder(_gpt_config(config, tokenizer, path, blend_per_split=per_split), sizes)
        datasets = [separate[i] if replaced[i] else datasets[i] for i in range(3)]
    _check_lengths(datasets, sizes, eval_needed)
    return tuple(datasets)


def _check_lengths(datasets, sizes, eval_needed: int) -> None:
    """An unweighted multi-prefix blend is one pass over the data: it can be shorter than requested."""
    needed = [sizes[0], eval_needed, eval_needed]
    for part, (ds, need) in enumerate(zip(datasets, needed)):
        if ds is not None and len(ds) < need:
            flag = "--data-path" if part == 0 else f"--data-path (or --{SPLIT_NAMES[part]}-data-path)"
            raise ConfigError(f"{flag}: the {SPLIT_NAMES[part]} data holds {len(ds)} samples but the run needs "
                              f"{need}; an unweighted list is used for one pass only: give weights "
                              "(W1 PREFIX1 W2 PREFIX2 ...) so the data repeats, or ask for fewer iterations")


# -- Micro-batches -------------------------------------------------------------------------------


class MegatronPretrainingBatchSampler:
    """Megatron-LM's ``MegatronPretrainingSampler`` (drop_last=True): sample order 0, 1, 2, ...

    Each chunk of ``micro_batch_size * dp_size`` consecutive samples starting at
    ``consumed_samples`` gives DP rank ``r`` the slice ``[r*mbs, (r+1)*mbs)`` of the chunk; an
    incomplete last chunk is dropped. Starting at ``consumed_samples`` resumes exactly.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad sampler layout: micro_batch_size={micro_batch_size}, "
                             f"dp_rank={dp_rank}, dp_size={dp_size}")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} is outside the dataset's {total_samples} samples")
        self.total, self.consumed = total_samples, consumed_samples
        self.mbs, self.rank, self.chunk = micro_batch_size, dp_rank, micro_batch_size * dp_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // self.chunk

    def __iter__(self) -> Iterator[List[int]]:
        for start in range(self.consumed, self.total - self.chunk + 1, self.chunk):
            first = start + self.rank * self.mbs
            yield list(range(first, first + self.mbs))


def collate_micro_batch(samples: List[dict]) -> Dict[str, torch.Tensor]:
    """Stack samples into ``{"tokens", "labels", "loss_mask", "position_ids"}``, each [mbs, S]."""
    return {key: torch.stack([torch.as_tensor(s[key]) for s in samples]) for key in BATCH_KEYS}


def micro_batches(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                  num_workers: int = 0, total_samples: Optional[int] = None) -> Iterator[Dict[str, torch.Tensor]]:
    """This DP rank's micro-batches from sample ``consumed_samples`` on (see the batch sampler), on CPU.

    Each item: tokens/labels/position_ids int64 and loss_mask float32, all [micro_batch_size, S].
    Ends after the last complete chunk before ``total_samples`` (default: the dataset's length).
    """
    total = len(dataset) if total_samples is None else min(int(total_samples), len(dataset))
    sampler = MegatronPretrainingBatchSampler(total, consumed_samples, micro_batch_size, dp_rank, dp_size)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=False,
        # its own generator: a DataLoader iterator draws a seed from the global RNG when it starts, which
        # shifted the dropout stream of a resumed run (created at the resume, not at iteration 0)
        generator=torch.Generator().manual_seed(0),
        persistent_workers=num_workers > 0, collate_fn=collate_micro_batch)
    return iter(loader)


def eval_micro_batches(dataset, micro_batch_size: int, dp_rank: int, dp_size: int, num_workers: int = 0,
                       start_sample: int = 0, num_samples: Optional[int] = None) -> Iterator[Dict[str, torch.Tensor]]:
    """Validation/test micro-batches over samples ``[start_sample, start_sample + num_samples)``.

    The trainer restarts at 0 each evaluation (same samples every time); pass the consumed
    validation samples as ``start_sample`` for Megatron-LM's advancing behaviour.
    """
    end = None if num_samples is None else start_sample + num_samples
    return micro_batches(dataset, start_sample, micro_batch_size, dp_rank, dp_size, num_workers, end)


# -- Routing-fluctuation probe -------------------------------------------------------------------


def probe_tokens(source, num_tokens: int, seq_length: int, seed: int) -> torch.Tensor:
    """Held-out sequences for the routing probe: LongTensor [ceil(num_tokens / seq_length), seq_length].

    ``source`` is the validation dataset (megatron GPT/Blended dataset: distinct samples chosen by
    ``seed``) or a DataConfig (non-overlapping windows of the validation documents' token stream:
    --valid-data-path, else the valid part of --split of --data-path, chosen by ``seed``).
    Deterministic in its arguments; sorted by position for readability.
    """
    if num_tokens < 1 or seq_length < 1:
        raise ConfigError(f"--routing-probe-tokens {num_tokens}: must be >= 1")
    count = math.ceil(num_tokens / seq_length)
    if hasattr(source, "data_path"):
        return _probe_from_files(source, count, seq_length, seed)
    if getattr(source.config, "sequence_length", seq_length) != seq_length:
        raise ValueError(f"probe seq_length {seq_length} differs from the dataset's {source.config.sequence_length}")
    if len(source) < count:
        raise ConfigError(f"--routing-probe-tokens {num_tokens}: the validation data has only {len(source)} "
                          f"samples of {seq_length} tokens; lower --routing-probe-tokens")
    picks = np.sort(np.random.RandomState(seed).choice(len(source), count, replace=False))
    return torch.stack([torch.as_tensor(source[int(i)]["tokens"]) for i in picks]).long()


def _validation_streams(data, tokens_needed: int) -> List[np.ndarray]:
    """Token arrays of the validation documents, one per prefix (memmapped; mock data: generated)."""
    if data.mock_data:
        return [_mock_validation_stream(data, tokens_needed)]
    blends = _blends(data)
    if blends["--valid-data-path"] is not None:
        return [_tokens(_indexed(p)) for p in blends["--valid-data-path"][0]]
    bookend = _split_matrix(data.split)[1]
    if bookend is None:
        raise ConfigError(f"--split {data.split}: the valid part is 0, so the routing probe has no held-out "
                          "data; give valid a share or pass --valid-data-path")
    streams = []
    for prefix in blends["--data-path"][0]:
        ds = _indexed(prefix)
        streams.append(_tokens(ds, *_document_range(len(ds.index.sequence_lengths), bookend)))
    return streams


def _probe_from_files(data, count: int, seq_length: int, seed: int) -> torch.Tensor:
    """``count`` distinct non-overlapping windows of the validation streams, picked by ``seed``."""
    streams = _validation_streams(data, 4 * count * seq_length)
    ends = np.cumsum([len(s) // seq_length for s in streams])  # window numbering over all streams
    total = int(ends[-1]) if len(ends) else 0
    if total < count:
        raise ConfigError(f"--routing-probe-tokens {count * seq_length}: the validation data has only "
                          f"{total * seq_length} tokens in whole sequences; lower --routing-probe-tokens")
    rows = []
    for pick in np.sort(np.random.RandomState(seed).choice(total, count, replace=False)):
        stream = int(np.searchsorted(ends, pick, side="right"))
        window = int(pick) - (int(ends[stream - 1]) if stream else 0)
        rows.append(np.asarray(streams[stream][window * seq_length:(window + 1) * seq_length]))
    return torch.from_numpy(np.stack(rows).astype(np.int64))

"""stablemoe_megatron.data on a tiny dataset built from the bundled corpus (one process, no torch.distributed)."""
import itertools
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from data_fixtures import tiny_dataset  # noqa: E402
from stablemoe_megatron import data as D  # noqa: E402
from stablemoe_megatron.config import RunConfig  # noqa: E402
from stablemoe_megatron.errors import ConfigError  # noqa: E402

SEQ, MBS, GBS = 64, 2, 8


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_dataset(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tokenizer(tiny):
    return D.tokenizer_from_config(make_config(tiny).data)


def make_config(tiny, data_path=None, split="90,8,2", train_iters=10, **data_fields) -> RunConfig:
    config = RunConfig()
    config.data.data_path = list(data_path or [tiny["prefix"]])
    config.data.split = split
    config.data.tokenizer_model = tiny["tokenizer_model"]
    for name, value in data_fields.items():
        setattr(config.data, name, value)
    config.model.seq_length = SEQ
    t = config.training
    t.micro_batch_size, t.global_batch_size, t.train_iters, t.eval_interval, t.eval_iters = MBS, GBS, train_iters, 5, 2
    return config


def documents(prefix, part=None, split="90,8,2"):
    """Brute force: the documents of ``prefix`` (optionally one split part) as int64 arrays, read one by one."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    n = len(ds)
    begin, end = (0, n) if part is None else D._document_range(n, D._split_matrix(split)[part])
    return [np.asarray(ds[i], dtype=np.int64) for i in range(begin, end)]


def occurs(row, docs) -> bool:
    """Whether ``row`` is a contiguous run of the concatenated documents' tokens."""
    stream = np.concatenate(docs)
    starts = np.flatnonzero(stream[: len(stream) - len(row) + 1] == row[0])
    return any(np.array_equal(stream[s:s + len(row)], row) for s in starts)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]), key


# -- fixture, flags, tokenizer --------------------------------------------------------------------


def test_tiny_dataset_is_cached_by_directory(tiny):
    stamp = os.path.getmtime(tiny["prefix"] + ".bin")
    assert tiny_dataset(tiny["dir"]) == tiny
    assert os.path.getmtime(tiny["prefix"] + ".bin") == stamp
    assert tiny["vocab_size"] == 500


def test_parse_blend():
    assert D.parse_blend([]) is None
    assert D.parse_blend(["a", "b"]) == (["a", "b"], None)
    assert D.parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    assert D.parse_blend(["0.3 a 0.7 b"]) == (["a", "b"], [0.3, 0.7])
    assert D.parse_blend(["2", "a"]) == (["a"], None)
    for bad in (["0.3", "a", "b"], ["0.3", "a", "x", "b"], ["0", "a", "1", "b"], ["-1", "a", "1", "b"]):
        with pytest.raises(ConfigError, match="--valid-data-path"):
            D.parse_blend(bad, "--valid-data-path")


def test_check_data_paths(tiny, tmp_path):
    D.check_data_paths(make_config(tiny, ["1", tiny["prefix"], "2", tiny["prefix2"]]).data)
    with pytest.raises(ConfigError, match=r"--data-path .*nope\.bin does not exist.*preprocess_data"):
        D.check_data_paths(make_config(tiny, [str(tmp_path / "nope")]).data)
    with pytest.raises(ConfigError, match="without .bin/.idx"):
        D.check_data_paths(make_config(tiny, [tiny["prefix"] + ".bin"]).data)
    with pytest.raises(ConfigError, match="did you mean .*train_text_document"):
        D.check_data_paths(make_config(tiny, [os.path.join(tiny["dir"], "train")]).data)
    (tmp_path / "half.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"--test-data-path .*half\.idx does not exist"):
        D.check_data_paths(make_config(tiny, test_data_path=[str(tmp_path / "half")]).data)
    with pytest.raises(ConfigError, match="--data-path is required"):
        D.check_data_paths(make_config(tiny, data_path=[""]).data)


def test_tokenizer_from_config(tiny, tokenizer):
    assert tokenizer.vocab_size == tiny["vocab_size"]
    with pytest.raises(ConfigError, match="--tokenizer-model"):
        D.tokenizer_from_config(make_config(tiny, tokenizer_model=tiny["prefix"] + ".missing").data)


# -- building ------------------------------------------------------------------------------------


def test_sample_counts(tiny):
    config = make_config(tiny, train_iters=23)
    assert D.sample_counts(config, 1) == (23 * GBS, (23 // 5 + 1) * 2 * GBS, 2 * GBS)
    config.training.global_batch_size = None  # micro x DP
    assert D.sample_counts(config, 4) == (23 * MBS * 4, 5 * 2 * MBS * 4, 2 * MBS * 4)


def test_single_prefix_samples(tiny, tokenizer):
    config = make_config(tiny)
    train, valid, test = D.build_datasets(config, tokenizer, 1)
    want = D.sample_counts(config, 1)
    assert [type(d).__name__ for d in (train, valid, test)] == ["GPTDataset"] * 3
    assert all(len(d) >= n for d, n in zip((train, valid, test), want))
    assert valid.config.tokenizer.eod == tokenizer.eod and valid.config.random_seed == config.training.seed
    for part, ds in enumerate((train, valid, test)):
        docs = documents(tiny["prefix"], part)
        for i in (0, 1, len(ds) - 1):
            sample = ds[i]
            assert sorted(sample) == sorted(D.BATCH_KEYS)
            tokens, labels = sample["tokens"], sample["labels"]
            assert tokens.shape == labels.shape == (SEQ,)
            assert torch.equal(tokens[1:], labels[:-1])  # labels are the tokens shifted by one
            assert torch.equal(sample["loss_mask"], torch.ones(SEQ))
            assert torch.equal(sample["position_ids"], torch.arange(SEQ))
            assert occurs(torch.cat([tokens, labels[-1:]]).numpy(), docs)  # from this split's documents


def test_blends_build(tiny, tokenizer):
    for path in (["0.3", tiny["prefix"], "0.7", tiny["prefix2"]], [tiny["prefix"], tiny["prefix2"]]):
        config = make_config(tiny, path)
        datasets = D.build_datasets(config, tokenizer, 1)
        assert [type(d).__name__ for d in datasets] == ["BlendedDataset"] * 3
        assert len(datasets[0]) >= D.sample_counts(config, 1)[0]
        batch = next(D.micro_batches(datasets[0], 0, MBS, 0, 1))
        assert sorted(batch) == sorted(D.BATCH_KEYS)  # megatron's "dataset_id" is dropped
        assert batch["tokens"].shape == (MBS, SEQ) and batch["tokens"].dtype == torch.int64
        assert batch["loss_mask"].dtype == torch.float32


def test_unweighted_blend_shorter_than_the_run(tiny, tokenizer):
    config = make_config(tiny, [tiny["prefix"], tiny["prefix2"]], train_iters=2000)
    config.training.eval_interval = 1000
    with pytest.raises(ConfigError, match=r"--data-path: the train data holds \d+ samples .* give weights"):
        D.build_datasets(config, tokenizer, 1)


def test_separate_valid_path_replaces_only_the_valid_part(tiny, tokenizer):
    plain = D.build_datasets(make_config(tiny), tokenizer, 1)
    config = make_config(tiny, valid_data_path=[tiny["valid_prefix"]])
    train, valid, test = D.build_datasets(config, tokenizer, 1)
    assert valid.dataset_path == tiny["valid_prefix"] and len(valid) >= D.sample_counts(config, 1)[1]
    sample = valid[3]
    assert occurs(torch.cat([sample["tokens"], sample["labels"][-1:]]).numpy(), documents(tiny["valid_prefix"]))
    for ours, theirs in ((train, plain[0]), (test, plain[2])):  # train and test parts unchanged
        assert len(ours) == len(theirs)
        assert torch.equal(ours[5]["tokens"], theirs[5]["tokens"])


def test_split_checks(tiny, tokenizer):
    # 200 documents: 969,30,1 gives the test part round(0.999 * 200) .. 200 = 0 documents.
    with pytest.raises(ConfigError, match=r"--split 969,30,1: the test part gets 0 of the 200 documents"):
        D.build_datasets(make_config(tiny, split="969,30,1"), tokenizer, 1)
    with pytest.raises(ConfigError, match="--split 0,1,0: the train part is 0"):
        D.build_datasets(make_config(tiny, split="0,1,0"), tokenizer, 1)
    for bad in ("a,b", "1,-1,0", "1,2,3,4", "0,0,0"):
        with pytest.raises(ConfigError, match="--split"):
            D.build_datasets(make_config(tiny, split=bad), tokenizer, 1)
    train, valid, test = D.build_datasets(make_config(tiny, split="100,0,0"), tokenizer, 1)
    assert train is not None and valid is None and test is None
    # A test path replaces the empty test part: no error.
    datasets = D.build_datasets(make_config(tiny, split="969,30,1", test_data_path=[tiny["valid_prefix"]]),
                                tokenizer, 1)
    assert datasets[2].dataset_path == tiny["valid_prefix"]


def test_cache_directory(tiny, tokenizer, tmp_path):
    assert D.cache_dir(make_config(tiny).data) == os.path.join(tiny["dir"], ".cache")
    cache = tmp_path / "cache"
    D.build_datasets(make_config(tiny, data_cache_path=str(cache)), tokenizer, 1)
    assert any(name.endswith("GPTDataset-train-shuffle_index.npy") for name in os.listdir(cache))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="--data-cache-path"):
        D.build_datasets(make_config(tiny, data_cache_path=str(tmp_path / "file" / "sub")), tokenizer, 1)


# -- micro-batches -------------------------------------------------------------------------------


def megatron_lm_sampler(total, consumed, mbs, rank, size):
    """Megatron-LM's MegatronPretrainingSampler.__iter__ (drop_last=True), verbatim in effect."""
    batch = []
    for idx in range(consumed, total):
        batch.append(idx)
        if len(batch) == mbs * size:
            yield batch[rank * mbs:(rank + 1) * mbs]
            batch = []


@pytest.mark.parametrize("total,consumed,mbs,size", [(50, 0, 2, 1), (50, 8, 2, 2), (51, 12, 3, 4), (7, 7, 1, 2)])
def test_batch_sampler_is_megatron_lm(total, consumed, mbs, size):
    for rank in range(size):
        ours = list(D.MegatronPretrainingBatchSampler(total, consumed, mbs, rank, size))
        assert ours == list(megatron_lm_sampler(total, consumed, mbs, rank, size))
        assert len(D.MegatronPretrainingBatchSampler(total, consumed, mbs, rank, size)) == len(ours)
    with pytest.raises(ValueError):
        D.MegatronPretrainingBatchSampler(total, total + 1, mbs, 0, size)


def test_resume_is_exact_and_dp_ranks_partition_the_global_batch(tiny, tokenizer):
    train = D.build_datasets(make_config(tiny), tokenizer, 1)[0]
    steps = 6
    full = take(D.micro_batches(train, 0, MBS, 0, 1), steps * GBS // MBS)
    for consumed in (GBS, 3 * GBS):
        resumed = take(D.micro_batches(train, consumed, MBS, 0, 1), (steps * GBS - consumed) // MBS)
        assert_batches_equal(resumed, full[consumed // MBS:])
    for consumed in (0, 2 * GBS):  # dp_size 2: rank r takes slice r of every chunk of MBS * 2 samples
        ranks = [take(D.micro_batches(train, consumed, MBS, r, 2), (steps * GBS - consumed) // (2 * MBS))
                 for r in range(2)]
        interleaved = [batch for pair in zip(*ranks) for batch in pair]
        assert_batches_equal(interleaved, full[consumed // MBS:])
    assert torch.equal(full[1]["tokens"][0], train[MBS]["tokens"])  # global order 0, 1, 2, ...


def test_worker_processes_give_the_same_batches(tiny, tokenizer):
    train = D.build_datasets(make_config(tiny), tokenizer, 1)[0]
    assert_batches_equal(take(D.micro_batches(train, 4, MBS, 1, 2, num_workers=1), 3),
                         take(D.micro_batches(train, 4, MBS, 1, 2), 3))


def test_eval_micro_batches_restart_and_window(tiny, tokenizer):
    valid = D.build_datasets(make_config(tiny), tokenizer, 1)[1]
    first = take(D.eval_micro_batches(valid, MBS, 0, 1), 4)
    assert_batches_equal(take(D.eval_micro_batches(valid, MBS, 0, 1), 4), first)  # restart at sample 0
    window = list(D.eval_micro_batches(valid, MBS, 0, 1, start_sample=2 * MBS, num_samples=2 * MBS))
    assert_batches_equal(window, first[2:4])


# -- token statistics and probe ------------------------------------------------------------------


def test_token_range(tiny, tmp_path):
    data = make_config(tiny, valid_data_path=[tiny["valid_prefix"]]).data
    D.check_token_range(data, tiny["vocab_size"])
    with pytest.raises(ConfigError, match=r"token id \d+ is outside \[0, 100\): the data was tokenized with a "
                                          r"larger vocabulary than the tokenizer's 100 ids: re-run preprocess_data"):
        D.check_token_range(data, 100)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "bad.bin"), dtype=np.uint16)
    builder.add_document(np.array([1, 2, 3], dtype=np.uint16), [3])
    builder.add_document(np.array([4, 600], dtype=np.uint16), [2])
    builder.finalize(str(tmp_path / "bad.idx"))
    with pytest.raises(ConfigError, match=r"--test-data-path .*bad: token id 600"):
        D.check_token_range(make_config(tiny, test_data_path=[str(tmp_path / "bad")]).data, 500)


def test_token_counts(tiny):
    vocab = tiny["vocab_size"]
    brute = np.zeros(vocab, dtype=np.int64)
    for doc in documents(tiny["prefix"], part=0):  # the train part only
        for token in doc.tolist():
            brute[token] += 1
    counts = D.token_counts(make_config(tiny).data, vocab)
    assert counts.dtype == torch.int64 and counts.shape == (vocab,)
    assert np.array_equal(counts.numpy(), brute)
    everything = np.bincount(np.concatenate(documents(tiny["prefix"]) + documents(tiny["prefix2"])), minlength=vocab)
    assert np.array_equal(D.token_counts(make_config(tiny, [tiny["prefix"], tiny["prefix2"]], split="1").data,
                                         vocab).numpy(), everything)
    weighted = D.token_counts(make_config(tiny, ["1", tiny["prefix"], "3", tiny["prefix2"]], split="1").data, vocab)
    a, b = (np.bincount(np.concatenate(documents(p)), minlength=vocab) for p in (tiny["prefix"], tiny["prefix2"]))
    total = a.sum() + b.sum()
    np.testing.assert_allclose(weighted.numpy(), a * 0.25 * total / a.sum() + b * 0.75 * total / b.sum(), atol=0.5)


def test_probe_tokens_from_dataset(tiny, tokenizer):
    valid = D.build_datasets(make_config(tiny), tokenizer, 1)[1]
    probe = D.probe_tokens(valid, 300, SEQ, seed=7)
    assert probe.shape == (math.ceil(300 / SEQ), SEQ) and probe.dtype == torch.int64
    assert torch.equal(probe, D.probe_tokens(valid, 300, SEQ, seed=7))
    assert not torch.equal(probe, D.probe_tokens(valid, 300, SEQ, seed=8))
    samples = [valid[i]["tokens"] for i in range(len(valid))]
    assert all(any(torch.equal(row, s) for s in samples) for row in probe)
    with pytest.raises(ConfigError, match="--routing-probe-tokens"):
        D.probe_tokens(valid, (len(valid) + 1) * SEQ, SEQ, seed=7)


def test_probe_tokens_from_config(tiny):
    data = make_config(tiny).data
    probe = D.probe_tokens(data, 1000, SEQ, seed=3)
    assert probe.shape == (math.ceil(1000 / SEQ), SEQ)
    assert torch.equal(probe, D.probe_tokens(data, 1000, SEQ, seed=3))
    valid_docs, train_docs = documents(tiny["prefix"], part=1), documents(tiny["prefix"], part=0)
    assert all(occurs(row.numpy(), valid_docs) for row in probe)
    assert not any(occurs(row.numpy(), train_docs) for row in probe)
    separate = D.probe_tokens(make_config(tiny, valid_data_path=[tiny["valid_prefix"]]).data, 200, SEQ, seed=3)
    assert all(occurs(row.numpy(), documents(tiny["valid_prefix"])) for row in separate)
    with pytest.raises(ConfigError, match="--routing-probe-tokens"):
        D.probe_tokens(data, 10**9, SEQ, seed=3)
    with pytest.raises(ConfigError, match="--split 100,0,0: the valid part is 0"):
        D.probe_tokens(make_config(tiny, split="100,0,0").data, 100, SEQ, seed=3)


# -- every rank builds (gloo world) --------------------------------------------------------------


def _rank_batches(config, cache, steps):
    """On each rank of a 2-process world: build the datasets, return this DP rank's first micro-batches."""
    from megatron.core import parallel_state as ps

    config.data.data_cache_path = cache
    tokenizer = D.tokenizer_from_config(config.data)
    train, valid, _ = D.build_datasets(config, tokenizer, 2)
    rank, size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    return (take(D.micro_batches(train, 0, MBS, rank, size), steps),
            take(D.micro_batches(valid, 0, MBS, rank, size), 2))


def test_all_ranks_build_rank_zero_first(tiny, tokenizer, tmp_path):
    """Rank 0 builds and caches the indices, the other rank loads them after the barrier: same data."""
    from distributed import run_distributed

    config = make_config(tiny, ["0.3", tiny["prefix"], "0.7", tiny["prefix2"]],
                         valid_data_path=[tiny["valid_prefix"]])
    config.training.global_batch_size = None  # MBS x 2 ranks
    ranks = run_distributed(_rank_batches, world_size=2, args=(config, str(tmp_path / "cache"), 4), timeout=240)
    config.training.global_batch_size = 2 * MBS
    config.data.data_cache_path = str(tmp_path / "single")
    train, valid, _ = D.build_datasets(config, tokenizer, 2)
    for part, ds, steps in ((0, train, 4), (1, valid, 2)):
        interleaved = [batch for pair in zip(ranks[0][part], ranks[1][part]) for batch in pair]
        assert_batches_equal(interleaved, take(D.micro_batches(ds, 0, MBS, 0, 1), 2 * steps))

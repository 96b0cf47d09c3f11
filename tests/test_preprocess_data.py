"""stablemoe-preprocess-data: round trips through IndexedDataset, empty documents written byte for byte as
Megatron-LM writes them, NullTokenizer input, bad input, empty input, atomic output, progress output for
terminals and for log files."""
import glob
import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from stablemoe_megatron.cli import preprocess_data, train_tokenizer
from stablemoe_megatron.tokenizer import build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "data", "corpus")
SP = "SentencePieceTokenizer"


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("sp") / "sp")
    train_tokenizer.main(["--input", os.path.join(CORPUS, "valid.jsonl"), "--model-prefix", prefix,
                          "--vocab-size", "800"])
    return prefix + ".model"


@pytest.fixture(scope="module")
def documents():
    """Real documents with two keys, plus edge cases: unicode, an empty text (an empty document)."""
    with open(os.path.join(CORPUS, "test.jsonl"), encoding="utf-8") as f:
        docs = [json.loads(line) for line in f][:12]
    docs.append({"text": "Grüße aus 東京 ☃\n\n  indented", "title": "unicode"})
    docs.append({"text": "", "title": "empty text"})
    return docs


def write_jsonl(path, docs, extra_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return str(path)


def read_dataset(prefix, mmap=True):
    """(IndexedDataset, every document's ids: [] for an empty one). ``mmap=False`` reads an empty .bin."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=mmap)
    bounds = [int(i) for i in ds.document_indices]
    # one sequence per document with tokens; an empty document has none (its two bounds are equal)
    assert all(end - begin in (0, 1) for begin, end in zip(bounds[:-1], bounds[1:])) and bounds[-1] == len(ds)
    return ds, [ds[begin].tolist() if end > begin else [] for begin, end in zip(bounds[:-1], bounds[1:])]


def expected_ids(tokenizer, texts, append_eod):
    """Every document's ids; an empty text is an empty document, without eod even with --append-eod."""
    out = []
    for text in texts:
        ids = tokenizer.tokenize(text)
        out.append(ids + [tokenizer.eod] if append_eod and ids else ids)
    return out


def megatron_reference(prefix, tokenizer, texts, append_eod):
    """Write ``prefix``.bin/.idx as Megatron-LM core_v0.16.1's tools/preprocess_data.py does without
    --split-sentences: its ``Encoder.encode`` (one sentence per document; the eod only after tokens)
    and ``IndexedDatasetBuilder.add_document(doc_ids, sentence_lens)`` for every document."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    for text in texts:
        doc_ids, sentence_lens = [], []
        sentence_ids = tokenizer.tokenize(text)
        if len(sentence_ids) > 0:
            doc_ids.extend(sentence_ids)
            sentence_lens.append(len(sentence_ids))
        if len(doc_ids) > 0 and append_eod:
            doc_ids.append(tokenizer.eod)
            sentence_lens[-1] += 1
        builder.add_document(doc_ids, sentence_lens)
    builder.finalize(prefix + ".idx")


def final_and_temp_files(out_dir):
    return sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []


@pytest.mark.parametrize("append_eod, workers, gz", [(False, 1, False), (True, 1, False), (False, 2, True),
                                                     (True, 2, False)])
def test_jsonl_two_keys_round_trip(tmp_path, sp_model, documents, append_eod, workers, gz, capsys):
    src = write_jsonl(tmp_path / "docs.jsonl", documents)
    if gz:
        with open(src, "rb") as f, gzip.open(src + ".gz", "wb") as packed:
            packed.write(f.read())
        src += ".gz"
    prefix = str(tmp_path / "out" / "ds")
    argv = ["--input", src, "--json-keys", "text", "title", "--output-prefix", prefix,
            "--tokenizer-type", SP, "--tokenizer-model", sp_model, "--workers", str(workers),
            "--chunksize", "3", "--log-interval", "5"]
    preprocess_data.main(argv + (["--append-eod"] if append_eod else []))
    tok = build_tokenizer(SP, tokenizer_model=sp_model)
    for key in ("text", "title"):
        ds, got = read_dataset(f"{prefix}_{key}_document")
        assert ds.index.dtype == np.uint16
        assert got == expected_ids(tok, [d[key] for d in documents], append_eod)
    summary = capsys.readouterr().out
    total_tokens = sum(map(len, expected_ids(tok, [d["text"] for d in documents], append_eod)))
    assert f"text: {len(documents)} documents (1 empty), {total_tokens} tokens -> " in summary
    assert f"title: {len(documents)} documents, " in summary
    assert final_and_temp_files(tmp_path / "out") == sorted(
        f"ds_{k}_document.{e}" for k in ("text", "title") for e in ("bin", "idx"))


@pytest.mark.parametrize("append_eod", [False, True])
def test_empty_texts_are_written_byte_for_byte_as_megatron_writes_them(tmp_path, sp_model, append_eod, capsys):
    texts = ["", "First document.", "", "Second, after an empty one.", "", ""]
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    prefix = str(tmp_path / "ds")
    preprocess_data.main(["--input", src, "--output-prefix", prefix, "--tokenizer-type", SP,
                          "--tokenizer-model", sp_model] + (["--append-eod"] if append_eod else []))
    tok = build_tokenizer(SP, tokenizer_model=sp_model)
    megatron_reference(str(tmp_path / "reference"), tok, texts, append_eod)
    for suffix in (".bin", ".idx"):
        with open(prefix + "_text_document" + suffix, "rb") as ours, open(tmp_path / f"reference{suffix}", "rb") as ref:
            assert ours.read() == ref.read()
    ds, got = read_dataset(prefix + "_text_document")
    assert list(ds.document_indices) == [0, 0, 1, 1, 2, 2, 2]  # 6 documents, 2 sequences
    eod = [tok.eod] if append_eod else []
    assert got == [[], tok.tokenize(texts[1]) + eod, [], tok.tokenize(texts[3]) + eod, [], []]
    assert "text: 6 documents (4 empty), " in capsys.readouterr().out


def test_null_tokenizer_input_is_token_ids(tmp_path, capsys):
    src = write_jsonl(tmp_path / "ids.jsonl", [{"text": "3 1 4"}, {"text": ""}, {"text": "63\n64  0"}])
    prefix = str(tmp_path / "ids")
    preprocess_data.main(["--input", src, "--output-prefix", prefix, "--tokenizer-type", "NullTokenizer",
                          "--vocab-size", "64", "--append-eod"])
    ds, got = read_dataset(prefix + "_text_document")
    assert ds.index.dtype == np.uint16
    assert got == [[3, 1, 4, 64], [], [63, 64, 0, 64]]  # eod = --vocab-size, also allowed in the text
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "1 2"}, {"text": "7 65"}])
    with pytest.raises(SystemExit) as exc:
        preprocess_data.main(["--input", bad, "--output-prefix", str(tmp_path / "out" / "ds"),
                              "--tokenizer-type", "NullTokenizer", "--vocab-size", "64"])
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [f"stablemoe-preprocess-data: error: {bad}:2: 'text': token id 65 is outside [0, 64] "
                      "(--vocab-size 64 plus the end-of-document id 64); fix or remove that line, or pass "
                      "--skip-bad-lines"]
    assert final_and_temp_files(tmp_path / "out") == []


def test_plain_text_paragraphs_and_gzip_round_trip(tmp_path, sp_model):
    paragraphs = ["First document,\nwith two lines.", "Second one.", "  Third, indented\n  and long " * 5]
    plain = tmp_path / "a.txt"
    plain.write_text("\n\n".join(paragraphs[:2]) + "\n\n\n")
    packed = tmp_path / "b.txt.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write("\n" + paragraphs[2] + "\n")
    prefix = str(tmp_path / "plain")
    preprocess_data.main(["--input", str(plain), str(packed), "--output-prefix", prefix, "--workers", "2",
                          "--tokenizer-type", SP, "--tokenizer-model", sp_model, "--append-eod"])
    tok = build_tokenizer(SP, tokenizer_model=sp_model)
    _, got = read_dataset(prefix + "_text_document")
    assert got == expected_ids(tok, paragraphs, append_eod=True)
    assert tok.detokenize(got[0][:-1]) == paragraphs[0]


@pytest.mark.parametrize("bad_line, problem", [
    ("this is not json", "not valid JSON"),
    ('{"body": "no text key"}', "no key 'text'"),
    ('{"text": ["a", "list"]}', "expected a string"),
    ('["an", "array"]', "expected a JSON object"),
])
def test_bad_line_stops_with_file_and_line(tmp_path, sp_model, documents, capsys, bad_line, problem):
    good = [d for d in documents if d["text"]][:4]
    src = write_jsonl(tmp_path / "in.jsonl", good[:2] + [{"text": "x"}], [bad_line] + [json.dumps(d) for d in good])
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        preprocess_data.main(["--input", src, "--output-prefix", str(out_dir / "ds"),
                              "--tokenizer-type", SP, "--tokenizer-model", sp_model])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{src}:4: " in err and problem in err and "--skip-bad-lines" in err
    assert final_and_temp_files(out_dir) == []


def test_skip_bad_lines_counts_and_reports(tmp_path, sp_model, documents, capsys):
    good = [d for d in documents if d["text"]][:5]
    src = write_jsonl(tmp_path / "in.jsonl", good, ["{broken", '{"text": 7}'])
    prefix = str(tmp_path / "ds")
    preprocess_data.main(["--input", src, "--output-prefix", prefix, "--skip-bad-lines",
                          "--tokenizer-type", SP, "--tokenizer-model", sp_model, "--workers", "2"])
    out = capsys.readouterr().out
    assert "skipped 2 bad records" in out
    assert f"{src}:6" in out and f"{src}:7" in out
    tok = build_tokenizer(SP, tokenizer_model=sp_model)
    assert read_dataset(prefix + "_text_document")[1] == expected_ids(tok, [d["text"] for d in good], False)


def test_bad_line_in_a_subprocess_exits_2_without_traceback(tmp_path, sp_model):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}], ['{"text": null}'])
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", src,
         "--output-prefix", str(tmp_path / "out" / "ds"), "--tokenizer-type", SP, "--tokenizer-model", sp_model],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [f"stablemoe-preprocess-data: error: {src}:2: value of 'text' is NoneType, expected a "
                      "string; fix or remove that line, or pass --skip-bad-lines"]
    assert final_and_temp_files(tmp_path / "out") == []


@pytest.mark.parametrize("argv_change, flag", [
    ({"--tokenizer-model": "/nonexistent.model"}, "--tokenizer-model"),
    ({"--input": "/nonexistent.jsonl"}, "--input"),
    ({"--workers": "0"}, "--workers"),
])
def test_bad_flags_exit_2_naming_the_flag(tmp_path, sp_model, capsys, argv_change, flag):
    args = {"--input": write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}]), "--output-prefix": str(tmp_path / "ds"),
            "--tokenizer-type": SP, "--tokenizer-model": sp_model, "--workers": "1"}
    args.update(argv_change)
    with pytest.raises(SystemExit) as exc:
        preprocess_data.main([item for pair in args.items() for item in pair])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_failure_mid_run_leaves_no_final_files_and_no_temporaries(tmp_path, sp_model, documents, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", documents)
    real_encode = preprocess_data.encode_record
    calls = []

    def failing_encode(record):
        calls.append(record)
        if len(calls) == 6:
            raise RuntimeError("injected failure")
        return real_encode(record)

    monkeypatch.setattr(preprocess_data, "encode_record", failing_encode)
    out_dir = tmp_path / "out"
    with pytest.raises(RuntimeError, match="injected failure"):
        preprocess_data.main(["--input", src, "--output-prefix", str(out_dir / "ds"),
                              "--tokenizer-type", SP, "--tokenizer-model", sp_model])
    assert len(calls) == 6  # five documents were written before the failure
    assert final_and_temp_files(out_dir) == []


def test_failure_while_renaming_removes_what_was_placed(tmp_path, sp_model, documents, monkeypatch):
    src = write_jsonl(tmp_path / "in.jsonl", documents)
    real_replace = os.replace
    renamed = []

    def replace_failing_on_idx(a, b):
        if str(b).endswith(".idx"):
            raise OSError("injected: disk full")
        renamed.append(b)
        real_replace(a, b)

    monkeypatch.setattr(preprocess_data.os, "replace", replace_failing_on_idx)
    out_dir = tmp_path / "out"
    with pytest.raises(OSError, match="injected"):
        preprocess_data.main(["--input", src, "--output-prefix", str(out_dir / "ds"), "--json-keys", "text", "title",
                              "--tokenizer-type", SP, "--tokenizer-model", sp_model])
    assert len(renamed) == 2  # both .bin files had reached their final names before the failure
    assert final_and_temp_files(out_dir) == []


def test_killed_run_leaves_no_dataset_under_final_names(tmp_path, sp_model):
    with open(os.path.join(CORPUS, "train.jsonl"), "rb") as f:
        corpus = f.read()
    big = tmp_path / "big.jsonl"
    big.write_bytes(corpus * 3)
    prefix = tmp_path / "out" / "ds"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(big),
         "--output-prefix", str(prefix), "--tokenizer-type", SP, "--tokenizer-model", sp_model, "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        partial = []
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            partial = glob.glob(f"{prefix}_text_document.bin.partial-*")
            if partial and os.path.getsize(partial[0]) > 100_000:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed; make the input larger"
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its pool workers
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert partial, "no partial output appeared before the kill"
    assert not os.path.exists(f"{prefix}_text_document.bin")
    assert not os.path.exists(f"{prefix}_text_document.idx")


EMPTY_FIX = "so no dataset was written; pass a file with at least one non-empty document"


@pytest.mark.parametrize("name, content, extra_argv, problem", [
    ("empty.jsonl", "", [], "no documents (the input is empty or only blank lines)"),
    ("blank_lines.txt", "\n  \n\n", [], "no documents (the input is empty or only blank lines)"),
    ("all_bad.jsonl", '{"text": 7}\n{broken\n', ["--skip-bad-lines"],
     "no documents (all 2 records were skipped as bad by --skip-bad-lines)"),
])
def test_input_without_documents_exits_2_and_writes_nothing(tmp_path, sp_model, capsys, name, content, extra_argv,
                                                           problem):
    src = tmp_path / name
    src.write_text(content)
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        preprocess_data.main(["--input", str(src), "--output-prefix", str(out_dir / "ds"), *extra_argv,
                              "--tokenizer-type", SP, "--tokenizer-model", sp_model])
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [f"stablemoe-preprocess-data: error: --input {src}: {problem}, {EMPTY_FIX}"]
    assert final_and_temp_files(out_dir) == []


@pytest.mark.parametrize("name, content, extra_argv, documents", [
    ("empty_texts.jsonl", '{"text": ""}\n\n{"text": ""}\n{"text": ""}\n', [], {"text": 3}),
    ("empty_and_bad.jsonl", '{"text": ""}\n{"text": 7}\n', ["--skip-bad-lines"], {"text": 1}),
    ("empty_titles.jsonl", '{"text": "a", "title": ""}\n{"text": "b", "title": ""}\n', ["--json-keys", "text", "title"],
     {"title": 2}),
])
def test_all_empty_documents_are_written_with_a_warning(tmp_path, sp_model, capsys, name, content, extra_argv,
                                                        documents):
    """Megatron-LM writes such a dataset (its documents have no sequence); so do we, and say that it is empty."""
    src = tmp_path / name
    src.write_text(content)
    prefix = str(tmp_path / "ds")
    preprocess_data.main(["--input", str(src), "--output-prefix", prefix, *extra_argv,
                          "--tokenizer-type", SP, "--tokenizer-model", sp_model])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning:" in line]
    assert warnings == [f"stablemoe-preprocess-data: warning: --input {src}: every {key!r} is empty ({n} documents, "
                        "0 tokens); written as Megatron-LM writes it, but training cannot use it"
                        for key, n in documents.items()]
    for key, n in documents.items():
        ds, got = read_dataset(f"{prefix}_{key}_document", mmap=False)
        assert list(ds.document_indices) == [0] * (n + 1) and got == [[]] * n
        assert os.path.getsize(f"{prefix}_{key}_document.bin") == 0


def test_progress_to_a_log_file_is_plain_lines(tmp_path, sp_model):
    """stderr redirected to a file (as under Slurm): whole progress lines, no tqdm carriage returns."""
    src = os.path.join(CORPUS, "valid.jsonl")
    with open(src, encoding="utf-8") as f:
        n_docs = sum(1 for line in f if line.strip())
    log = tmp_path / "preprocess.log"
    with open(log, "wb") as err:
        proc = subprocess.run(
            [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", src, "--log-interval", "5",
             "--output-prefix", str(tmp_path / "ds"), "--tokenizer-type", SP, "--tokenizer-model", sp_model],
            stdout=subprocess.PIPE, stderr=err, timeout=120,
        )
    text = log.read_bytes().decode()  # bytes: reading in text mode would turn '\r' into '\n'
    assert proc.returncode == 0, text
    assert "\r" not in text and b"\r" not in proc.stdout
    final = rf"stablemoe-preprocess-data: {n_docs} docs, [0-9.]+ MB, [0-9]+ docs/s, [0-9.]+ MB/s \(all input read\)"
    assert re.search(rf"^{final}$", text, re.MULTILINE), text
    assert f"text: {n_docs} documents".encode() in proc.stdout


def test_plain_progress_writes_a_line_per_interval_and_at_the_end():
    stats = preprocess_data.RunStats()
    stream = io.StringIO()
    progress = preprocess_data.make_progress(stats, stream)
    assert isinstance(progress, preprocess_data.PlainProgress)  # StringIO is not a terminal
    stats.records, stats.bytes = 10, 2_500_000
    progress.update(10)
    assert stream.getvalue() == ""  # less than PLAIN_PROGRESS_SECONDS since the start
    every_time = preprocess_data.PlainProgress(stats, stream, interval=0.0)
    every_time.update(10)
    stats.records = 20
    every_time.finish()
    lines = stream.getvalue().split("\n")
    assert lines[-1] == "" and "\r" not in stream.getvalue()
    assert re.fullmatch(r"stablemoe-preprocess-data: 10 docs, 2\.50 MB, [0-9]+ docs/s, [0-9.]+ MB/s", lines[0])
    assert re.fullmatch(r"stablemoe-preprocess-data: 20 docs, 2\.50 MB, .* \(all input read\)", lines[1])


def test_terminal_gets_the_tqdm_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = preprocess_data.make_progress(preprocess_data.RunStats(), stream)
    assert isinstance(progress, preprocess_data.BarProgress)
    progress.update(7)
    progress.close()
    assert "7docs" in stream.getvalue()

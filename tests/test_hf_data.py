"""Datasets through Hugging Face `datasets`: local parquet/jsonl/arrow/save_to_disk inputs,
resumable sharded prepare, --max-tokens, checksums checked by training, offline errors."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from jaxgpt import cli, data, sources, train  # noqa: E402
from jaxgpt import prepare as prepare_lib  # noqa: E402 (prepare() below is a helper)

EOT = "<|endoftext|>"
SHARD = 500


@pytest.fixture(scope="module")
def docs(shakespeare_text) -> list[str]:
    paragraphs = [p + "\n" for p in shakespeare_text[:30_000].split("\n\n")]
    return paragraphs[:80] + ["", "naïve café, 東京 and 🙂\n"] + paragraphs[80:120]


@pytest.fixture(scope="module")
def parquet(tmp_path_factory, docs):
    path = tmp_path_factory.mktemp("src") / "docs.parquet"
    datasets.Dataset.from_dict({"text": docs, "id": list(range(len(docs)))}).to_parquet(str(path))
    return path


def val_doc(i: int, f: float = 0.1) -> bool:
    return int((i + 1) * f) > int(i * f)


def split_tokens(out, meta, split) -> np.ndarray:
    return np.concatenate([np.fromfile(out / f["name"], np.uint16) for f in meta["splits"][split]["files"]])


def hf_gpt2_tokenizer():
    from transformers import GPT2TokenizerFast

    from jaxgpt.tokenizer import gpt2_file

    return GPT2TokenizerFast(vocab=str(gpt2_file("encoder.json")), merges=str(gpt2_file("vocab.bpe")))


def prepare(src, out, **kw):
    kw = {"encoding": "gpt2", "shard_size": SHARD, "workers": 1, **kw}
    return prepare_lib.prepare(sources.resolve_source(str(src)), out, **kw)


def test_shards_hold_the_documents_joined_by_endoftext(tmp_path, parquet, docs):
    meta = prepare(parquet, tmp_path / "d")
    texts = [d for d in docs if d]
    want = {"train": [d for i, d in enumerate(texts) if not val_doc(i)],
            "val": [d for i, d in enumerate(texts) if val_doc(i)]}
    hf_tok = hf_gpt2_tokenizer()  # an independent GPT-2 BPE (Hugging Face tokenizers)
    for split, split_docs in want.items():
        ids = split_tokens(tmp_path / "d", meta, split)
        expected = []
        for d in split_docs:
            expected += ([50256] if expected else []) + hf_tok.encode(d)
        np.testing.assert_array_equal(ids, expected)
        assert hf_tok.decode(ids.tolist()) == EOT.join(split_docs)
        rec = meta["splits"][split]
        assert rec["tokens"] == ids.size == sum(f["tokens"] for f in rec["files"])
        assert rec["bytes"] == sum(len(d.encode()) for d in split_docs)
        assert [f["tokens"] for f in rec["files"][:-1]] == [SHARD] * (len(rec["files"]) - 1)
    assert len(meta["splits"]["train"]["files"]) > 3
    assert meta["source_chars"] == sum(map(len, texts))
    assert json.loads((tmp_path / "d" / "meta.json").read_text()) == meta
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(
        ["meta.json"] + [f["name"] for s in ("train", "val") for f in meta["splits"][s]["files"]])


@pytest.mark.parametrize("kind", ["jsonl", "arrow", "save_to_disk", "input"])
def test_every_input_kind_gives_the_same_shards(tmp_path, parquet, docs, kind):
    ds = datasets.Dataset.from_dict({"text": docs})
    if kind == "jsonl":
        src = tmp_path / "docs.jsonl"
        ds.to_json(str(src))
    elif kind == "arrow":
        ds.save_to_disk(str(tmp_path / "saved"))
        src = tmp_path / "arrow"
        src.mkdir()
        for f in (tmp_path / "saved").glob("*.arrow"):
            f.rename(src / f.name)
    elif kind == "save_to_disk":
        src = tmp_path / "saved"
        datasets.DatasetDict({"train": ds}).save_to_disk(str(src))
    if kind == "input":  # a Hub shortcut read from local files
        source = sources.resolve_source("tinystories", str(parquet))
        got = prepare_lib.prepare(source, tmp_path / "d", "gpt2", shard_size=SHARD, workers=1)
    else:
        got = prepare(src, tmp_path / "d")
    want = prepare(parquet, tmp_path / "want")
    assert got["splits"] == want["splits"]  # token and byte counts and the sha256 of every shard


def test_max_tokens_keeps_a_prefix_of_each_split(tmp_path, parquet, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_CHARS", 2000)
    full = prepare(parquet, tmp_path / "full")
    meta = prepare(parquet, tmp_path / "cut", max_tokens=2000)
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == 2000
    for split in ("train", "val"):
        cut = split_tokens(tmp_path / "cut", meta, split)
        np.testing.assert_array_equal(cut, split_tokens(tmp_path / "full", full, split)[: cut.size])
    assert meta["source_chars"] < full["source_chars"] / 2  # reading stopped soon after


# Runs a prepare in a subprocess that SIGKILLs itself: KILL="close:N" right after the N-th
# shard is renamed into place (before the progress is saved), "write:N" at the N-th write.
DRIVER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from jaxgpt import prepare, sources

    what, n = os.environ["KILL"].split(":")
    calls = {"close": 0, "write": 0}
    sources.CHUNK_CHARS = 2000
    close, write = prepare._SplitWriter._close, prepare._SplitWriter.write

    def hurt(name, original):
        def wrapper(self, *args):
            if name == "close" and self._f is None:
                return original(self, *args)
            out = original(self, *args)
            calls[name] += 1
            if name == what and calls[name] == int(n):
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return wrapper

    prepare._SplitWriter._close = hurt("close", close)
    prepare._SplitWriter.write = hurt("write", write)
    prepare.prepare(sources.resolve_source(sys.argv[1]), Path(sys.argv[2]), "gpt2", shard_size=int(sys.argv[3]), workers=1)
""")


@pytest.mark.parametrize("kill", ["close:5", "write:40"])
def test_killed_prepare_resumes_to_the_same_bytes(tmp_path, parquet, monkeypatch, kill):
    monkeypatch.setattr(sources, "CHUNK_CHARS", 2000)
    encoded = []
    encode = prepare_lib._encode_batch
    monkeypatch.setattr(prepare_lib, "_encode_batch", lambda *a: encoded.append(1) or encode(*a))
    prepare(parquet, tmp_path / "straight")
    batches = len(encoded)

    out = tmp_path / "resumed"
    r = subprocess.run([sys.executable, "-c", DRIVER, str(parquet), str(out), str(SHARD)],
                       env={**os.environ, "KILL": kill}, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not (out / "meta.json").exists() and (out / prepare_lib.PARTIAL / prepare_lib.STATE_FILE).exists()
    encoded.clear()
    logs = []
    prepare(parquet, out, log=logs.append)
    assert any(s.startswith("resuming") for s in logs), logs
    assert 0 < len(encoded) < batches  # it skipped what the complete shards hold

    straight = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert sorted(p.name for p in out.iterdir()) == straight
    for name in straight:
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_training_names_a_corrupted_shard(tmp_path, parquet):
    from test_train import tiny_config

    prepare(parquet, tmp_path / "d")
    shard = tmp_path / "d" / "train_000002.bin"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match="train_000002.bin does not match its sha256"):
        train.train(tiny_config(tmp_path / "d", tmp_path / "run"), log=lambda s: None)


def test_offline_hub_and_bad_columns_are_one_line_errors(tmp_path, capsys, parquet):
    assert cli.main(["prepare", "fineweb-edu", "--encoding", "gpt2", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--input PATH" in err and "HuggingFaceFW/fineweb-edu:sample-10BT" in err
    assert cli.main(["prepare", str(parquet), "--text-field", "body", "--out", str(tmp_path / "y")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no column 'body' (it has text, id): pass --text-field" in err

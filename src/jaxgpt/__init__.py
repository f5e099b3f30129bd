"""jaxgpt: a readable, fast GPT in pure JAX."""

from jaxgpt.config import Config, GPTConfig
from jaxgpt.generate import generate
from jaxgpt.hf import load_hf, save_hf
from jaxgpt.model import abstract_params, count_params, forward, init_params, loss_fn
from jaxgpt.tokenizer import get_tokenizer

__version__ = "0.1.0"

__all__ = [
    "Config",
    "GPTConfig",
    "abstract_params",
    "count_params",
    "forward",
    "generate",
    "get_tokenizer",
    "init_params",
    "load_hf",
    "loss_fn",
    "save_hf",
]

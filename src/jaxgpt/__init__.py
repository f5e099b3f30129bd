"""jaxgpt: a readable, fast GPT in pure JAX.

The public API below is imported on first use, so `import jaxgpt` (and `jaxgpt --help`)
does not pay for importing JAX."""

import importlib
import sys
import types

__version__ = "0.1.0"

_API = {
    "Config": "config",
    "GPTConfig": "config",
    "abstract_params": "model",
    "count_params": "model",
    "forward": "model",
    "init_params": "model",
    "loss_fn": "model",
    "generate": "generate",
    "load_hf": "hf",
    "save_hf": "hf",
    "load_model": "load",
    "get_tokenizer": "tokenizer",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'jaxgpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"jaxgpt.{_API[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


class _Package(types.ModuleType):
    """Keeps `jaxgpt.generate` the function: importing the submodule of that name would
    otherwise set the package's attribute to the module."""

    def __setattr__(self, name: str, value) -> None:
        if not (name in _API and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

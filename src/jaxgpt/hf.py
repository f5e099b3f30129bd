"""GPT-2 in Hugging Face's layout: load a checkpoint from a directory or the Hub, save one
that `transformers.GPT2LMHeadModel.from_pretrained` loads.

jaxgpt's tree uses HF's names and HF's Conv1D [in, out] kernels, so conversion is a
rename: `h.0.attn.c_attn.kernel` is `transformer.h.0.attn.c_attn.weight`.
"""

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.flax
import safetensors.numpy

from jaxgpt import model
from jaxgpt import tokenizer as tokenizer_lib
from jaxgpt.config import GPTConfig
from jaxgpt.errors import UserError


class HFError(UserError):
    """A checkpoint that is missing, unreachable or not a GPT-2 jaxgpt can run."""


# GPT2Config's activation_function -> GPTConfig's activation. gelu_pytorch_tanh is gelu_new
# computed by torch: the same tanh approximation.
_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def config_from_hf(hf: dict, where: str = "config.json") -> GPTConfig:
    """The GPTConfig of an HF GPT-2 config.json; an error for anything jaxgpt computes differently.

    reorder_and_upcast_attn is accepted as it is: jaxgpt computes attention scores in float32 always."""
    if hf.get("model_type") != "gpt2":
        raise HFError(f"{where} has model_type {hf.get('model_type')!r}; jaxgpt loads only GPT-2 ('gpt2')")
    n_embd = hf.get("n_embd", 768)
    n_inner = hf.get("n_inner")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    unsupported = {  # key -> (whether its value is unsupported, what is)
        "activation_function": (hf.get("activation_function", "gelu_new") not in _ACTIVATIONS,
                                "supported: " + ", ".join(_ACTIVATIONS)),
        "n_inner": (n_inner is not None and (type(n_inner) is not int or n_inner < 1),
                    "supported: a positive integer, or null for 4 * n_embd"),
        "layer_norm_epsilon": (type(eps) not in (int, float) or eps < 0, "supported: a number >= 0"),
        "tie_word_embeddings": (not hf.get("tie_word_embeddings", True),
                                "supported: true; jaxgpt's output layer is the token embedding"),
        "add_cross_attention": (hf.get("add_cross_attention", False),
                                "supported: false; jaxgpt's GPT-2 is decoder-only"),
    }
    for key, (bad, supported) in unsupported.items():
        if bad:
            raise HFError(f"{where} sets {key} = {hf[key]!r}, which jaxgpt's GPT-2 does not support ({supported})")
    return GPTConfig(
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        n_embd=n_embd,
        block_size=hf.get("n_positions", 1024),
        vocab_size=hf.get("vocab_size", 50257),
        dropout=float(hf.get("resid_pdrop", 0.1)),
        bias=True,  # HF's GPT-2 always has biases
        n_inner=n_inner,
        activation=_ACTIVATIONS[hf.get("activation_function", "gelu_new")],
        layer_norm_eps=float(eps),
        scale_attn_weights=bool(hf.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
    )


def config_to_hf(cfg: GPTConfig) -> dict:
    """The config.json of `cfg` as transformers' GPT2LMHeadModel."""
    # <|endoftext|> exists only in GPT-2's own vocabulary, not in a char-level one.
    eot = 50256 if cfg.vocab_size >= 50257 else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.n_inner,
        "activation_function": cfg.activation,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": cfg.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "dtype": "float32",
    }


def _named_leaves(tree) -> dict:
    """A param tree's leaves by HF name, without the `transformer.` prefix:
    h.0.attn.c_attn.kernel is h.0.attn.c_attn.weight, wte is wte.weight."""
    named = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(k.key) if isinstance(k, jax.tree_util.DictKey) else str(k.idx) for k in path]
        if keys[-1] in ("kernel", "scale"):
            keys[-1] = "weight"
        elif len(keys) == 1:
            keys.append("weight")
        named[".".join(keys)] = leaf
    return named


def _read_safetensors(path: Path) -> dict[str, jax.Array]:
    try:  # safetensors' JAX reader: its numpy one cannot read bfloat16
        return safetensors.flax.load_file(path)
    except safetensors.SafetensorError as e:
        raise HFError(f"{path} is not a readable safetensors file ({e})") from None


def _read_tensors(directory: Path) -> dict:
    """All tensors of an HF checkpoint directory, names without the `transformer.` prefix."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        tensors = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            tensors |= _read_safetensors(directory / shard)
    elif (directory / "model.safetensors").is_file():
        tensors = _read_safetensors(directory / "model.safetensors")
    elif (directory / "pytorch_model.bin").is_file():
        try:
            import torch
        except ImportError:
            raise HFError(f"{directory} holds pytorch_model.bin, which needs torch: pip install torch") from None
        try:  # weights_only: a pickle from the internet must not run code
            state = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError) as e:
            reason = str(e).strip().splitlines()[0]
            raise HFError(f"{directory}/pytorch_model.bin holds more than plain tensors ({reason})") from None
        tensors = {k: v.float().numpy() for k, v in state.items()}
    else:
        raise HFError(f"{directory} has no model.safetensors or pytorch_model.bin")
    return {k.removeprefix("transformer."): v for k, v in tensors.items()}


def _download(name: str) -> Path:
    """A Hub model's config and safetensors, through huggingface_hub's cache."""
    fix = "pass a local directory holding config.json and model.safetensors"
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path; Hub names are NAME or ORG/NAME
        raise HFError(f"no directory {name!r}; {fix}")
    try:
        import huggingface_hub
    except ImportError:
        raise HFError(f"no directory {name!r}; {fix}, or pip install huggingface_hub to download it") from None
    try:
        path = huggingface_hub.snapshot_download(
            name, allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json"]
        )
    except huggingface_hub.errors.LocalEntryNotFoundError:
        raise HFError(f"no directory {name!r}, and the Hub is offline or unreachable with no cached copy; {fix}") from None
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HFError(f"no directory {name!r}, and the Hugging Face Hub cannot give it ({reason}); {fix}") from None
    return Path(path)


def load_hf(path_or_name: str | Path) -> tuple[GPTConfig, dict]:
    """(config, params) of an HF GPT-2 checkpoint: a local directory, or a Hub name such
    as gpt2, gpt2-medium, gpt2-large, gpt2-xl. Params are float32 whatever was stored."""
    directory = Path(path_or_name)
    if not directory.is_dir():
        if directory.exists():
            raise HFError(f"{directory} is a file; pass the checkpoint's directory (config.json, model.safetensors)")
        directory = _download(str(path_or_name))
    if not (directory / "config.json").is_file():
        raise HFError(f"{directory} has no config.json, so it is not a Hugging Face checkpoint")
    config_file = directory / "config.json"
    try:
        cfg = config_from_hf(json.loads(config_file.read_text()), str(config_file))
    except json.JSONDecodeError as e:
        raise HFError(f"{config_file} is not valid JSON ({e})") from None
    tensors = _read_tensors(directory)
    abstract = model.abstract_params(cfg)
    expected = _named_leaves(abstract)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise HFError(f"{directory} lacks {len(missing)} of GPT-2's tensors, e.g. {missing[0]}")
    for name, x in expected.items():
        if tensors[name].shape != x.shape:
            raise HFError(f"{directory}: {name} has shape {tensors[name].shape}, config.json implies {x.shape}")
    leaves = [jnp.asarray(tensors.pop(name), jnp.float32) for name in expected]
    return cfg, jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def init_from(path_or_name: str | Path, cfg: GPTConfig) -> tuple[GPTConfig, dict]:
    """An HF GPT-2 to fine-tune (`train.init_from`): its shape and weights, with `cfg`'s
    dropout and block_size. `cfg.vocab_size` is the data's, which the checkpoint's must cover;
    a shorter block_size crops the position table, as nanoGPT does."""
    hf_cfg, params = load_hf(path_or_name)
    if cfg.vocab_size > hf_cfg.vocab_size:
        raise HFError(
            f"the data's vocabulary ({cfg.vocab_size}) is larger than {path_or_name}'s ({hf_cfg.vocab_size}): "
            "prepare the data with --encoding gpt2"
        )
    if cfg.block_size > hf_cfg.block_size:
        raise HFError(f"block_size {cfg.block_size} exceeds {path_or_name}'s {hf_cfg.block_size} positions: lower it")
    params = params | {"wpe": params["wpe"][: cfg.block_size]}
    return dataclasses.replace(hf_cfg, dropout=cfg.dropout, block_size=cfg.block_size), params


def save_hf(cfg: GPTConfig, params: dict, path: str | Path, tokenizer=None) -> None:
    """Writes config.json and model.safetensors (float32) for transformers' GPT2LMHeadModel.
    A model without biases (`cfg.bias` false) gets zero biases: HF's GPT-2 always has them.
    With GPT-2's tokenizer, its files go along, so AutoTokenizer and pipelines load the
    directory too."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ours = _named_leaves(params)
    hf_layout = _named_leaves(model.abstract_params(dataclasses.replace(cfg, bias=True)))
    tensors = {}
    for name, x in hf_layout.items():
        value = ours[name] if name in ours else np.zeros(x.shape)
        tensors[f"transformer.{name}"] = np.ascontiguousarray(value, np.float32)
    safetensors.numpy.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
    if isinstance(tokenizer, tokenizer_lib.GPT2Tokenizer):
        shutil.copyfile(tokenizer_lib.gpt2_file("encoder.json"), path / "vocab.json")
        shutil.copyfile(tokenizer_lib.gpt2_file("vocab.bpe"), path / "merges.txt")
        tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": cfg.block_size}
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")

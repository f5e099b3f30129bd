"""Hugging Face checkpoints: load GPT-2, Llama and Qwen3 from a directory or the Hub, save
one that `transformers.AutoModelForCausalLM.from_pretrained` loads.

GPT-2: jaxgpt's tree uses HF's names and HF's Conv1D [in, out] kernels, so conversion is a
rename: `h.0.attn.c_attn.kernel` is `transformer.h.0.attn.c_attn.weight`.

Llama and Qwen3 (rope, rmsnorm, swiglu [+ qk_norm]): torch Linear weights are [out, in],
so kernels are transposed, and the fused c_attn is split into q_proj, k_proj and v_proj.
jaxgpt's RoPE pairs dims as HF's `rotate_half` does, so no weight is permuted.
"""

import dataclasses
import functools
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
    """A checkpoint that is missing, unreachable or not a GPT-2, Llama or Qwen3 jaxgpt can
    run, or a model with no HF architecture to export to."""


# model_type -> (the name in messages, the transformers class that runs it)
_ARCHITECTURES = {
    "gpt2": ("GPT-2", "GPT2LMHeadModel"),
    "llama": ("Llama", "LlamaForCausalLM"),
    "qwen3": ("Qwen3", "Qwen3ForCausalLM"),
}
_EXPORTABLE = ("GPT2LMHeadModel takes pos = learned, norm = layernorm, mlp = gelu, tie_embeddings = true, "
               "n_kv_head = n_head, head_dim = n_embd // n_head, no qk_norm, no logit_softcap; LlamaForCausalLM "
               "takes pos = rope, norm = rmsnorm, mlp = swiglu, scale_attn_weights = true, no "
               "scale_attn_by_inverse_layer_idx, no logit_softcap; Qwen3ForCausalLM is that with qk_norm = true "
               "and bias = false")


def architecture(cfg: GPTConfig) -> str:
    """The model_type that computes what `cfg` does (gpt2, llama or qwen3); an HFError naming
    the first switch that none of them has. The family is chosen by the positions."""
    H, G, K = model.head_dims(cfg)
    if cfg.pos == "learned":
        kind = "gpt2"
        checks = {"norm": cfg.norm == "layernorm", "mlp": cfg.mlp == "gelu", "qk_norm": not cfg.qk_norm,
                  "n_kv_head": G == H, "head_dim": H * K == cfg.n_embd, "tie_embeddings": cfg.tie_embeddings}
    else:
        kind = "qwen3" if cfg.qk_norm else "llama"
        checks = {"norm": cfg.norm == "rmsnorm", "mlp": cfg.mlp == "swiglu",
                  "scale_attn_weights": cfg.scale_attn_weights,
                  "scale_attn_by_inverse_layer_idx": not cfg.scale_attn_by_inverse_layer_idx,
                  "bias": kind == "llama" or not cfg.bias}  # Qwen3's MLP has no biases
    checks["logit_softcap"] = cfg.logit_softcap is None
    for switch, ok in checks.items():
        if not ok:
            raise HFError(f"model.{switch} = {getattr(cfg, switch)!r} with model.pos = {cfg.pos!r} has no Hugging "
                          f"Face architecture here ({_EXPORTABLE}); the run stays usable in jaxgpt (sample, eval)")
    return kind


# GPT2Config's activation_function -> GPTConfig's activation. gelu_pytorch_tanh is gelu_new
# computed by torch: the same tanh approximation.
_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}


def config_from_hf(hf: dict, where: str = "config.json") -> GPTConfig:
    """The GPTConfig of an HF GPT-2, Llama or Qwen3 config.json; an error for anything jaxgpt
    computes differently."""
    if hf.get("model_type") == "gpt2":
        return _gpt2_config_from_hf(hf, where)
    if hf.get("model_type") in ("llama", "qwen3"):
        return _llama_config_from_hf(hf, where)
    raise HFError(f"{where} has model_type {hf.get('model_type')!r}; jaxgpt loads "
                  + ", ".join(f"{name} ({kind!r})" for kind, (name, _) in _ARCHITECTURES.items()))


def _raise_unsupported(hf: dict, where: str, name: str, unsupported: dict) -> None:
    """An HFError for the first key of `unsupported` (key -> (whether its value is
    unsupported, what is)) whose value is."""
    for key, (bad, supported) in unsupported.items():
        if bad:
            raise HFError(f"{where} sets {key} = {hf[key]!r}, which jaxgpt's {name} does not support ({supported})")


def _gpt2_config_from_hf(hf: dict, where: str) -> GPTConfig:
    """reorder_and_upcast_attn is accepted as it is: jaxgpt computes attention scores in float32 always."""
    n_embd = hf.get("n_embd", 768)
    n_inner = hf.get("n_inner")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    _raise_unsupported(hf, where, "GPT-2", {
        "activation_function": (hf.get("activation_function", "gelu_new") not in _ACTIVATIONS,
                                "supported: " + ", ".join(_ACTIVATIONS)),
        "n_inner": (n_inner is not None and (type(n_inner) is not int or n_inner < 1),
                    "supported: a positive integer, or null for 4 * n_embd"),
        "layer_norm_epsilon": (type(eps) not in (int, float) or eps < 0, "supported: a number >= 0"),
        "tie_word_embeddings": (not hf.get("tie_word_embeddings", True),
                                "supported: true; jaxgpt's output layer is the token embedding"),
        "add_cross_attention": (hf.get("add_cross_attention", False),
                                "supported: false; jaxgpt's GPT-2 is decoder-only"),
    })
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


_LLAMA_SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def _llama_config_from_hf(hf: dict, where: str) -> GPTConfig:
    """pretraining_tp is accepted whatever it is: transformers 4 split the same matmuls into
    slices with it, transformers 5 ignores it."""
    kind = hf["model_type"]
    name = _ARCHITECTURES[kind][0]
    for key in _LLAMA_SHAPE_KEYS:
        if key not in hf:
            raise HFError(f"{where} has model_type {kind!r} but no {key}; a {name} config.json states its shape "
                          f"({', '.join(_LLAMA_SHAPE_KEYS)})")
    # transformers 5 writes rope_parameters (rope_type, rope_theta); 4 wrote rope_theta and rope_scaling.
    rope_key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf.get(rope_key) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    eps = hf.get("rms_norm_eps", 1e-6)
    _raise_unsupported(hf, where, name, {
        "hidden_act": (hf.get("hidden_act", "silu") != "silu", "supported: silu, SwiGLU's"),
        rope_key: (rope_type != "default" or bool(set(rope) - {"rope_type", "type", "rope_theta"}),
                   "supported: rope_type 'default' with rope_theta, rotary positions without scaling"),
        "rms_norm_eps": (type(eps) not in (int, float) or eps < 0, "supported: a number >= 0"),
        "use_sliding_window": (hf.get("use_sliding_window", False),
                               "supported: false; jaxgpt attends to the whole block"),
        "layer_types": (any(t != "full_attention" for t in hf.get("layer_types") or []),
                        "supported: full_attention in every layer"),
    })
    H = hf["num_attention_heads"]
    # Qwen3Config's head_dim defaults to 128, LlamaConfig's to hidden_size // num_attention_heads.
    head_dim = hf.get("head_dim") or (128 if kind == "qwen3" else hf["hidden_size"] // H)
    return GPTConfig(
        n_layer=hf["num_hidden_layers"],
        n_head=H,
        n_embd=hf["hidden_size"],
        block_size=hf.get("max_position_embeddings", 32768 if kind == "qwen3" else 2048),
        vocab_size=hf["vocab_size"],
        dropout=float(hf.get("attention_dropout", 0.0)),
        bias=bool(hf.get("attention_bias", False) or hf.get("mlp_bias", False)),
        n_inner=hf["intermediate_size"],
        layer_norm_eps=float(eps),
        pos="rope",
        rope_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm="rmsnorm",
        qk_norm=kind == "qwen3",
        mlp="swiglu",
        n_kv_head=hf.get("num_key_value_heads") or H,
        head_dim=head_dim,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def config_to_hf(cfg: GPTConfig) -> dict:
    """The config.json of `cfg` as transformers' GPT2LMHeadModel, LlamaForCausalLM or
    Qwen3ForCausalLM (see `architecture`)."""
    kind = architecture(cfg)
    # <|endoftext|> exists only in GPT-2's own vocabulary, not in a char-level one.
    eot = 50256 if cfg.vocab_size >= 50257 else None
    if kind != "gpt2":
        return _llama_config_to_hf(cfg, kind, eot)
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


def _llama_config_to_hf(cfg: GPTConfig, kind: str, eot: int | None) -> dict:
    H, G, K = model.head_dims(cfg)
    hf = {
        "architectures": [_ARCHITECTURES[kind][1]],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.n_inner if cfg.n_inner is not None else 4 * cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": H,
        "num_key_value_heads": G,
        "head_dim": K,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.layer_norm_eps,
        # transformers 5 reads rope_parameters; rope_theta is for transformers 4.
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "rope_theta": cfg.rope_base,
        "attention_bias": cfg.bias,
        "attention_dropout": cfg.dropout,  # read back as jaxgpt's dropout: training only
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": eot,  # not LlamaConfig's defaults 1 and 2, which would be ordinary tokens here
        "eos_token_id": eot,
        "pad_token_id": None,
        "dtype": "float32",
    }
    if kind == "llama":
        return hf | {"mlp_bias": cfg.bias, "pretraining_tp": 1}
    return hf | {"use_sliding_window": False, "sliding_window": None}


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


# jaxgpt's dense layers (other than the fused c_attn) -> their names in a Llama/Qwen3 layer.
_LLAMA_DENSE = {("attn", "c_proj"): "self_attn.o_proj", ("mlp", "c_gate"): "mlp.gate_proj",
                ("mlp", "c_fc"): "mlp.up_proj", ("mlp", "c_proj"): "mlp.down_proj"}


def _llama_tensors(cfg: GPTConfig, params: dict) -> dict:
    """`params` by LlamaForCausalLM's / Qwen3ForCausalLM's names, weights [out, in]. Written
    with jnp, so that `jax.eval_shape` of it gives the tensors a checkpoint must hold."""
    H, G, K = model.head_dims(cfg)
    named = {"model.embed_tokens.weight": params["wte"], "model.norm.weight": params["ln_f"]["scale"]}
    for i, block in enumerate(params["h"]):
        prefix = f"model.layers.{i}."
        # c_attn's columns are [q (H·K) | k (G·K) | v (G·K)], its bias's too
        qkv = {key: jnp.split(x, [H * K, (H + G) * K], axis=-1) for key, x in block["attn"]["c_attn"].items()}
        dense = {f"self_attn.{x}_proj": {key: parts[j] for key, parts in qkv.items()} for j, x in enumerate("qkv")}
        dense |= {hf_name: block[part][name] for (part, name), hf_name in _LLAMA_DENSE.items()}
        for hf_name, p in dense.items():
            named[f"{prefix}{hf_name}.weight"] = p["kernel"].T
            if "bias" in p:
                named[f"{prefix}{hf_name}.bias"] = p["bias"]
        named[f"{prefix}input_layernorm.weight"] = block["ln_1"]["scale"]
        named[f"{prefix}post_attention_layernorm.weight"] = block["ln_2"]["scale"]
        if cfg.qk_norm:
            named[f"{prefix}self_attn.q_norm.weight"] = block["attn"]["q_norm"]["scale"]
            named[f"{prefix}self_attn.k_norm.weight"] = block["attn"]["k_norm"]["scale"]
    if "lm_head" in params:  # [V, D], torch's layout already
        named["lm_head.weight"] = params["lm_head"]
    return named


def _llama_params(cfg: GPTConfig, named: dict) -> dict:
    """The inverse of `_llama_tensors`."""

    def dense(name: str) -> dict:
        p = {"kernel": named[f"{name}.weight"].T}
        return p | {"bias": named[f"{name}.bias"]} if cfg.bias else p

    blocks = []
    for i in range(cfg.n_layer):
        prefix = f"model.layers.{i}."
        q, k, v = (dense(f"{prefix}self_attn.{x}_proj") for x in "qkv")
        block = {"ln_1": {"scale": named[f"{prefix}input_layernorm.weight"]},
                 "attn": {"c_attn": {key: jnp.concatenate([q[key], k[key], v[key]], axis=-1) for key in q}},
                 "ln_2": {"scale": named[f"{prefix}post_attention_layernorm.weight"]}, "mlp": {}}
        for (part, name), hf_name in _LLAMA_DENSE.items():
            block[part][name] = dense(prefix + hf_name)
        if cfg.qk_norm:
            block["attn"] |= {"q_norm": {"scale": named[f"{prefix}self_attn.q_norm.weight"]},
                              "k_norm": {"scale": named[f"{prefix}self_attn.k_norm.weight"]}}
        blocks.append(block)
    params = {"wte": named["model.embed_tokens.weight"], "h": blocks, "ln_f": {"scale": named["model.norm.weight"]}}
    return params | ({} if cfg.tie_embeddings else {"lm_head": named["lm_head.weight"]})


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


def _zero_absent_biases(hf: dict, expected: dict, tensors: dict) -> None:
    """Zeros in `tensors` for the biases a Llama/Qwen3 leaves out (attention_bias and mlp_bias
    apart, Qwen3's MLP never) where jaxgpt's one `bias` switch gives every dense layer one:
    a zero bias computes the same."""
    has_bias = {"self_attn.": hf.get("attention_bias", False), "mlp.": hf.get("mlp_bias", False)}
    for name, x in expected.items():
        if name.endswith(".bias") and not any(has and part in name for part, has in has_bias.items()):
            tensors[name] = np.zeros(x.shape, np.float32)


def load_hf(path_or_name: str | Path) -> tuple[GPTConfig, dict]:
    """(config, params) of an HF GPT-2, Llama or Qwen3 checkpoint: a local directory, or a
    Hub name such as gpt2, gpt2-medium, gpt2-large, gpt2-xl. Params are float32 whatever
    was stored."""
    directory = Path(path_or_name)
    if not directory.is_dir():
        if directory.exists():
            raise HFError(f"{directory} is a file; pass the checkpoint's directory (config.json, model.safetensors)")
        directory = _download(str(path_or_name))
    if not (directory / "config.json").is_file():
        raise HFError(f"{directory} has no config.json, so it is not a Hugging Face checkpoint")
    config_file = directory / "config.json"
    try:
        hf = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise HFError(f"{config_file} is not valid JSON ({e})") from None
    cfg = config_from_hf(hf, str(config_file))
    tensors = _read_tensors(directory)
    abstract = model.abstract_params(cfg)
    if cfg.pos == "learned":  # GPT-2: the only one with a learned position table
        expected = _named_leaves(abstract)
    else:
        expected = jax.eval_shape(functools.partial(_llama_tensors, cfg), abstract)
        if cfg.bias:
            _zero_absent_biases(hf, expected, tensors)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise HFError(f"{directory} lacks {len(missing)} of {_ARCHITECTURES[hf['model_type']][0]}'s tensors, "
                      f"e.g. {missing[0]}")
    for name, x in expected.items():
        if tensors[name].shape != x.shape:
            raise HFError(f"{directory}: {name} has shape {tensors[name].shape}, config.json implies {x.shape}")
    named = {name: jnp.asarray(tensors.pop(name), jnp.float32) for name in expected}
    if cfg.pos == "learned":
        return cfg, jax.tree.unflatten(jax.tree.structure(abstract), list(named.values()))
    return cfg, _llama_params(cfg, named)


def init_from(path_or_name: str | Path, cfg: GPTConfig) -> tuple[GPTConfig, dict]:
    """An HF checkpoint to fine-tune (`train.init_from`): its shape and weights, with `cfg`'s
    dropout and block_size. `cfg.vocab_size` is the data's, which the checkpoint's must cover;
    a shorter block_size crops GPT-2's position table, as nanoGPT does (rotary positions
    have none)."""
    hf_cfg, params = load_hf(path_or_name)
    if cfg.vocab_size > hf_cfg.vocab_size:
        fix = "prepare the data with --encoding gpt2" if hf_cfg.pos == "learned" else "use data of a smaller vocabulary"
        raise HFError(f"the data's vocabulary ({cfg.vocab_size}) is larger than {path_or_name}'s "
                      f"({hf_cfg.vocab_size}): {fix}")
    if cfg.block_size > hf_cfg.block_size:
        raise HFError(f"block_size {cfg.block_size} exceeds {path_or_name}'s {hf_cfg.block_size} positions: lower it")
    if "wpe" in params:
        params = params | {"wpe": params["wpe"][: cfg.block_size]}
    return dataclasses.replace(hf_cfg, dropout=cfg.dropout, block_size=cfg.block_size), params


def save_hf(cfg: GPTConfig, params: dict, path: str | Path, tokenizer=None) -> None:
    """Writes config.json and model.safetensors (float32) for transformers'
    GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM, whichever computes what `cfg`
    does (an HFError where none does, before anything is written). A GPT-2 without biases
    (`cfg.bias` false) gets zero biases: HF's GPT-2 always has them. With GPT-2's tokenizer,
    its files go along, so AutoTokenizer and pipelines load the directory too."""
    kind = architecture(cfg)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if kind == "gpt2":
        ours = _named_leaves(params)
        hf_layout = _named_leaves(model.abstract_params(dataclasses.replace(cfg, bias=True)))
        tensors = {}
        for name, x in hf_layout.items():
            value = ours[name] if name in ours else np.zeros(x.shape)
            tensors[f"transformer.{name}"] = np.ascontiguousarray(value, np.float32)
    else:
        tensors = {name: np.ascontiguousarray(x, np.float32) for name, x in _llama_tensors(cfg, params).items()}
    safetensors.numpy.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2) + "\n")
    if isinstance(tokenizer, tokenizer_lib.GPT2Tokenizer):
        shutil.copyfile(tokenizer_lib.gpt2_file("encoder.json"), path / "vocab.json")
        shutil.copyfile(tokenizer_lib.gpt2_file("vocab.bpe"), path / "merges.txt")
        tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": cfg.block_size}
        (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")

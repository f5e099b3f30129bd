"""GPT-2: a params pytree and pure functions of (params, tokens, config).

Shapes live in names: B batch, T time, D width, H heads, K head width, F MLP width (n_inner, 4·D by default),
V vocab, N = B·T tokens. Matmuls run on 2-D [N, D] activations: XLA:CPU computes
their gradients far faster than those of 3-D ones (see FACTS.md).

Compute follows the params' dtype: called on params cast to bfloat16 (as training does
under `compute_dtype`), the matmuls run in bfloat16 while LayerNorm statistics, softmax,
logits and the loss stay float32.
"""

import functools
import math

import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig

Params = dict


def _dense_init(key, d_in: int, d_out: int, std: float, bias: bool) -> dict:
    p = {"kernel": std * jax.random.normal(key, (d_in, d_out), jnp.float32)}
    if bias:
        p["bias"] = jnp.zeros((d_out,), jnp.float32)
    return p


def _norm_init(d: int, bias: bool) -> dict:
    p = {"scale": jnp.ones((d,), jnp.float32)}
    if bias:
        p["bias"] = jnp.zeros((d,), jnp.float32)
    return p


def init_params(cfg: GPTConfig, key: jax.Array) -> Params:
    """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2·n_layer)."""
    D, std = cfg.n_embd, 0.02
    F = cfg.n_inner if cfg.n_inner is not None else 4 * D
    proj_std = std / math.sqrt(2 * cfg.n_layer)
    k_wte, k_wpe, *k_layers = jax.random.split(key, 2 + cfg.n_layer)
    blocks = []
    for k in k_layers:
        k_qkv, k_out, k_fc, k_proj = jax.random.split(k, 4)
        blocks.append({
            "ln_1": _norm_init(D, cfg.bias),
            "attn": {
                "c_attn": _dense_init(k_qkv, D, 3 * D, std, cfg.bias),
                "c_proj": _dense_init(k_out, D, D, proj_std, cfg.bias),
            },
            "ln_2": _norm_init(D, cfg.bias),
            "mlp": {
                "c_fc": _dense_init(k_fc, D, F, std, cfg.bias),
                "c_proj": _dense_init(k_proj, F, D, proj_std, cfg.bias),
            },
        })
    return {
        "wte": std * jax.random.normal(k_wte, (cfg.vocab_size, D), jnp.float32),
        "wpe": std * jax.random.normal(k_wpe, (cfg.block_size, D), jnp.float32),
        "h": blocks,
        "ln_f": _norm_init(D, cfg.bias),
    }


def abstract_params(cfg: GPTConfig) -> Params:
    """The param tree as ShapeDtypeStructs, without allocating anything."""
    return jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))


def count_params(params: Params, cfg: GPTConfig | None = None, *, non_embedding: bool = False) -> int:
    """Number of parameters; `non_embedding` leaves out the position table (as nanoGPT does)."""
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return n - math.prod(params["wpe"].shape) if non_embedding else n


def flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per token, forward and backward: 6·N + 12·L·T·D (nanoGPT's and PaLM's
    count; N are the parameters without the position table, T the context)."""
    n = count_params(abstract_params(cfg), non_embedding=True)
    return 6 * n + 12 * cfg.n_layer * cfg.block_size * cfg.n_embd


def _dense(p: dict, x_ND: jax.Array) -> jax.Array:
    if "kernel_T" in p:  # see `transpose_kernels`
        y = jax.lax.optimization_barrier(p["kernel_T"] @ x_ND.T).T
    else:
        y = x_ND @ p["kernel"]
    return y + p["bias"] if "bias" in p else y


def _layer_norm(p: dict, x_ND: jax.Array, eps: float) -> jax.Array:
    """LayerNorm in float32, returned in the input's dtype."""
    x32_ND = x_ND.astype(jnp.float32)
    mean_N1 = x32_ND.mean(-1, keepdims=True)
    var_N1 = jnp.square(x32_ND - mean_N1).mean(-1, keepdims=True)
    y_ND = (x32_ND - mean_N1) * jax.lax.rsqrt(var_N1 + eps) * p["scale"]
    y_ND = y_ND + p["bias"] if "bias" in p else y_ND
    return y_ND.astype(x_ND.dtype)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def _score_divisor(cfg: GPTConfig, layer: int) -> float:
    """What layer `layer`'s attention scores are divided by, as in transformers' GPT-2."""
    divisor = math.sqrt(cfg.n_embd // cfg.n_head) if cfg.scale_attn_weights else 1.0
    return divisor * (layer + 1) if cfg.scale_attn_by_inverse_layer_idx else divisor


@functools.cache
def _cudnn_attention_compiles(shape: tuple[int, ...], dtype) -> bool:
    """Whether cuDNN's fused attention compiles here for [B, T, H, K] inputs of `dtype` (it
    needs a GPU, and jax's cuDNN attention is known broken with some CUDA versions)."""
    x = jax.ShapeDtypeStruct(shape, dtype)
    attend = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn")
    try:
        jax.jit(attend).lower(x, x, x).compile()
    except Exception:  # any failure to build it: XLA's attention computes the same
        return False
    return True


def attention_implementation(q_BTHK) -> str | None:
    """cuDNN's fused (flash) attention where it applies: a GPU, bfloat16 or float16, a head
    width that is a multiple of 8 up to 128, and a build where it compiles; else None, XLA's
    own attention, which gives the same results."""
    K = q_BTHK.shape[-1]
    if jax.default_backend() != "gpu" or q_BTHK.dtype not in (jnp.bfloat16, jnp.float16) or K % 8 or K > 128:
        return None
    return "cudnn" if _cudnn_attention_compiles(tuple(q_BTHK.shape), q_BTHK.dtype) else None


def _attention(q_BTHK, k_BTHK, v_BTHK, divisor: float, rate: float, key: jax.Array | None) -> jax.Array:
    """Causal softmax attention of scores q·k / `divisor`, computed in float32 whatever the
    inputs' dtype. Without dropout it is `jax.nn.dot_product_attention`, cuDNN's where it applies."""
    if key is None or rate == 0.0:
        return jax.nn.dot_product_attention(q_BTHK, k_BTHK, v_BTHK, scale=1 / divisor, is_causal=True,
                                            implementation=attention_implementation(q_BTHK))
    T = q_BTHK.shape[1]
    s_BHTT = jnp.einsum("bqhk,bshk->bhqs", q_BTHK, k_BTHK, preferred_element_type=jnp.float32) / divisor
    causal_TT = jnp.tril(jnp.ones((T, T), bool))
    s_BHTT = jnp.where(causal_TT, s_BHTT, jnp.finfo(s_BHTT.dtype).min)
    p_BHTT = _dropout(jax.nn.softmax(s_BHTT, axis=-1), rate, key).astype(v_BTHK.dtype)
    return jnp.einsum("bhqs,bshk->bqhk", p_BHTT, v_BTHK)


def _qkv(p: dict, x_ND: jax.Array, B: int, cfg: GPTConfig) -> list[jax.Array]:
    """The block's queries, keys and values, each [B, T, H, K]."""
    (N, D), H = x_ND.shape, cfg.n_head
    qkv_N3D = _dense(p["attn"]["c_attn"], _layer_norm(p["ln_1"], x_ND, cfg.layer_norm_eps))
    return [a.reshape(B, N // B, H, D // H) for a in jnp.split(qkv_N3D, 3, axis=-1)]


_ACTIVATIONS = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
}


def _mlp_residual(p: dict, x_ND: jax.Array, cfg: GPTConfig, key: jax.Array | None) -> jax.Array:
    h_NF = _ACTIVATIONS[cfg.activation](_dense(p["mlp"]["c_fc"], _layer_norm(p["ln_2"], x_ND, cfg.layer_norm_eps)))
    return x_ND + _dropout(_dense(p["mlp"]["c_proj"], h_NF), cfg.dropout, key)


def _block(p: dict, x_ND: jax.Array, B: int, cfg: GPTConfig, layer: int, key: jax.Array | None) -> jax.Array:
    k_attn, k_resid1, k_resid2 = jax.random.split(key, 3) if key is not None else (None,) * 3
    q_BTHK, k_BTHK, v_BTHK = _qkv(p, x_ND, B, cfg)
    y_ND = _attention(q_BTHK, k_BTHK, v_BTHK, _score_divisor(cfg, layer), cfg.dropout, k_attn).reshape(x_ND.shape)
    x_ND = x_ND + _dropout(_dense(p["attn"]["c_proj"], y_ND), cfg.dropout, k_resid1)
    return _mlp_residual(p, x_ND, cfg, k_resid2)


# Under remat, a block keeps the outputs of its weight matmuls and recomputes the cheap
# rest (LayerNorm, GELU, attention scores) in the backward pass.
_block_remat = jax.checkpoint(_block, static_argnums=(2, 3, 4),
                              policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def hidden(params: Params, tokens_BT: jax.Array, cfg: GPTConfig, key: jax.Array | None = None, *,
           remat: bool = False) -> jax.Array:
    """Final-LayerNorm hidden states [N, D]. `key` turns dropout on (training); `remat`
    recomputes each block's activations in the backward pass instead of storing them."""
    B, T = tokens_BT.shape
    if T > cfg.block_size:
        raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
    x_BTD = params["wte"][tokens_BT] + params["wpe"][:T]
    keys = jax.random.split(key, cfg.n_layer + 1) if key is not None else [None] * (cfg.n_layer + 1)
    x_ND = _dropout(x_BTD.reshape(B * T, -1), cfg.dropout, keys[0])
    block = _block_remat if remat else _block
    for layer, (p_block, k) in enumerate(zip(params["h"], keys[1:])):
        x_ND = block(p_block, x_ND, B, cfg, layer, k)
    return _layer_norm(params["ln_f"], x_ND, cfg.layer_norm_eps)


def forward(params: Params, tokens_BT: jax.Array, cfg: GPTConfig, key: jax.Array | None = None) -> jax.Array:
    """Logits float32 [B, T, V] for int tokens [B, T]; the output layer is tied to `wte`."""
    B, T = tokens_BT.shape
    return _logits(params, hidden(params, tokens_BT, cfg, key)).reshape(B, T, -1)


def _logits(params: Params, h_ND: jax.Array) -> jax.Array:
    return jnp.matmul(h_ND, params["wte"].T, preferred_element_type=jnp.float32)


def loss_fn(params: Params, tokens_BT, targets_BT, cfg: GPTConfig, key=None, mask_BT=None, *,
            remat: bool = False) -> jax.Array:
    """Mean next-token cross-entropy; `mask_BT` (0/1) leaves positions out of the mean."""
    logits_NV = _logits(params, hidden(params, tokens_BT, cfg, key, remat=remat))
    logz_N = jax.nn.logsumexp(logits_NV, axis=-1)
    target_logit_N = jnp.take_along_axis(logits_NV, targets_BT.reshape(-1, 1), axis=-1)[:, 0]
    nll_N = logz_N - target_logit_N
    if mask_BT is None:
        return nll_N.mean()
    mask_N = mask_BT.reshape(-1).astype(nll_N.dtype)
    return (nll_N * mask_N).sum() / jnp.maximum(mask_N.sum(), 1.0)


def transpose_kernels(params: Params) -> Params:
    """The params with every block's kernel stored [out, in] (as `kernel_T`), for decoding
    a few rows at a time: XLA:CPU multiplies 2-16 rows by a large weight ~1.3x faster with
    the weight as the left operand (measured on GPT-2 124M at 8 rows). The barrier in
    `_dense` keeps XLA from folding the transposes back into the original dot."""

    def dense_T(p):
        return {"kernel_T": p["kernel"].T} | {k: v for k, v in p.items() if k != "kernel"}

    blocks = [
        b | {part: {name: dense_T(p) for name, p in b[part].items()} for part in ("attn", "mlp")}
        for b in params["h"]
    ]
    return params | {"h": blocks}


def init_cache(cfg: GPTConfig, batch: int, length: int, dtype=jnp.float32) -> dict:
    """An empty KV cache of `length` slots per row, its keys and values in `dtype` (the
    compute dtype: the params'). A slot's position is -1 until written.

    Each layer has its own keys and values, stored [batch, head, slot, head width] so that
    attention reads each head's slots contiguously and no step copies a layer out of a
    stacked cache."""
    shape = (batch, cfg.n_head, length, cfg.n_embd // cfg.n_head)
    return {
        "k_BHSK": [jnp.zeros(shape, dtype) for _ in range(cfg.n_layer)],
        "v_BHSK": [jnp.zeros(shape, dtype) for _ in range(cfg.n_layer)],
        "pos_BS": jnp.full((batch, length), -1, jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def grow_cache(cache: dict, length: int) -> dict:
    """The cache with empty slots appended up to `length` slots per row."""
    pad = length - cache["pos_BS"].shape[1]
    slots_BHSK = ((0, 0), (0, 0), (0, pad), (0, 0))
    return cache | {
        "k_BHSK": [jnp.pad(a, slots_BHSK) for a in cache["k_BHSK"]],
        "v_BHSK": [jnp.pad(a, slots_BHSK) for a in cache["v_BHSK"]],
        "pos_BS": jnp.pad(cache["pos_BS"], ((0, 0), (0, pad)), constant_values=-1),
    }


def _block_cached(p: dict, x_ND, kv: tuple, index, mask_B1TS, cfg: GPTConfig, layer: int):
    """Block `layer`, whose attention reads its cache `kv` after writing this call's keys
    and values at slot `index`, seeing the slots `mask_B1TS` allows; returns (x_ND, kv)."""
    N, D = x_ND.shape
    q_BHTK, k_BHTK, v_BHTK = (a.transpose(0, 2, 1, 3) for a in _qkv(p, x_ND, mask_B1TS.shape[0], cfg))
    k_BHSK = jax.lax.dynamic_update_slice(kv[0], k_BHTK, (0, 0, index, 0))
    v_BHSK = jax.lax.dynamic_update_slice(kv[1], v_BHTK, (0, 0, index, 0))
    s_BHTS = jnp.einsum("bhtk,bhsk->bhts", q_BHTK, k_BHSK) / _score_divisor(cfg, layer)
    p_BHTS = jax.nn.softmax(jnp.where(mask_B1TS, s_BHTS, jnp.finfo(s_BHTS.dtype).min), axis=-1)
    y_BTHK = jnp.einsum("bhts,bhsk->bthk", p_BHTS, v_BHSK)
    x_ND = _mlp_residual(p, x_ND + _dense(p["attn"]["c_proj"], y_BTHK.reshape(N, D)), cfg, None)
    return x_ND, (k_BHSK, v_BHSK)


def hidden_cached(params: Params, tokens_BT, positions_BT, cache: dict, cfg: GPTConfig):
    """`hidden` for tokens written at cache slots [index, index + T): returns ([N, D], cache).

    Each token attends to the cached slots whose positions lie in [0, its own position]:
    causal, and blind to padding (position -1). No dropout: this is for inference.
    """
    B, T = tokens_BT.shape
    index = cache["index"]
    pos_BS = jax.lax.dynamic_update_slice(cache["pos_BS"], positions_BT, (0, index))
    kpos_B11S = pos_BS[:, None, None, :]
    mask_B1TS = (kpos_B11S >= 0) & (kpos_B11S <= positions_BT[:, None, :, None])
    pos_BT = jnp.clip(positions_BT, 0, cfg.block_size - 1)
    x_ND = (params["wte"][tokens_BT] + params["wpe"][pos_BT]).reshape(B * T, -1)
    k_cache, v_cache = [], []
    for layer, (p_block, *kv) in enumerate(zip(params["h"], cache["k_BHSK"], cache["v_BHSK"])):
        x_ND, (k_BHSK, v_BHSK) = _block_cached(p_block, x_ND, kv, index, mask_B1TS, cfg, layer)
        k_cache.append(k_BHSK)
        v_cache.append(v_BHSK)
    h_ND = _layer_norm(params["ln_f"], x_ND, cfg.layer_norm_eps)
    return h_ND, {"k_BHSK": k_cache, "v_BHSK": v_cache, "pos_BS": pos_BS, "index": index + T}


def forward_cached(params: Params, tokens_BT, positions_BT, cache: dict, cfg: GPTConfig):
    """Logits float32 [B, T, V] and the updated cache; see `hidden_cached`."""
    B, T = tokens_BT.shape
    h_ND, cache = hidden_cached(params, tokens_BT, positions_BT, cache, cfg)
    return _logits(params, h_ND).reshape(B, T, -1), cache

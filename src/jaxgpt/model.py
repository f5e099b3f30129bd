"""GPT: a params pytree and pure functions of (params, tokens, config).

GPT-2 by default; config switches give the modern variants (rotary positions, RMSNorm,
QK-norm, relu² or SwiGLU MLPs, grouped-query attention, an untied head, logit soft-capping),
enough to express Llama and Qwen3.

Shapes live in names: B batch, T time, D width, H heads, G key/value heads (H with plain
multi-head attention), K head width, F MLP width (n_inner, 4·D by default), V vocab,
N = B·T tokens. Matmuls run on 2-D [N, D] activations: XLA:CPU computes
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


def head_dims(cfg: GPTConfig) -> tuple[int, int, int]:
    """(H, G, K): query heads, key/value heads and head width."""
    return cfg.n_head, cfg.n_kv_head or cfg.n_head, cfg.head_dim or cfg.n_embd // cfg.n_head


def init_params(cfg: GPTConfig, key: jax.Array) -> Params:
    """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2·n_layer)
    (or zero, under `zero_init_proj`)."""
    D, std = cfg.n_embd, 0.02
    (H, G, K), F = head_dims(cfg), cfg.n_inner if cfg.n_inner is not None else 4 * D
    proj_std = 0.0 if cfg.zero_init_proj else std / math.sqrt(2 * cfg.n_layer)
    norm_bias = cfg.bias and cfg.norm == "layernorm"
    k_wte, k_wpe, k_head, *k_layers = jax.random.split(key, 3 + cfg.n_layer)
    blocks = []
    for k in k_layers:
        k_qkv, k_out, k_fc, k_proj, k_gate = jax.random.split(k, 5)
        attn = {
            "c_attn": _dense_init(k_qkv, D, (H + 2 * G) * K, std, cfg.bias),
            "c_proj": _dense_init(k_out, H * K, D, proj_std, cfg.bias),
        }
        if cfg.qk_norm:
            attn |= {"q_norm": _norm_init(K, False), "k_norm": _norm_init(K, False)}
        mlp = {"c_fc": _dense_init(k_fc, D, F, std, cfg.bias), "c_proj": _dense_init(k_proj, F, D, proj_std, cfg.bias)}
        if cfg.mlp == "swiglu":
            mlp["c_gate"] = _dense_init(k_gate, D, F, std, cfg.bias)
        blocks.append({"ln_1": _norm_init(D, norm_bias), "attn": attn, "ln_2": _norm_init(D, norm_bias), "mlp": mlp})
    params = {"wte": std * jax.random.normal(k_wte, (cfg.vocab_size, D), jnp.float32)}
    if cfg.pos == "learned":
        params["wpe"] = std * jax.random.normal(k_wpe, (cfg.block_size, D), jnp.float32)
    params |= {"h": blocks, "ln_f": _norm_init(D, norm_bias)}
    if not cfg.tie_embeddings:  # [V, D] as wte, so that both heads read the same way
        head_std = 0.0 if cfg.zero_init_proj else std
        params["lm_head"] = head_std * jax.random.normal(k_head, (cfg.vocab_size, D), jnp.float32)
    return params


def abstract_params(cfg: GPTConfig) -> Params:
    """The param tree as ShapeDtypeStructs, without allocating anything."""
    return jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))


def count_params(params: Params, cfg: GPTConfig | None = None, *, non_embedding: bool = False) -> int:
    """Number of parameters; `non_embedding` leaves out the position table (as nanoGPT does)."""
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return n - math.prod(params["wpe"].shape) if non_embedding and "wpe" in params else n


def flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per token, forward and backward: 6·N + 12·L·T·H·K (nanoGPT's and PaLM's
    count; N are the parameters without the position table, T the context, H·K = D for GPT-2)."""
    n = count_params(abstract_params(cfg), non_embedding=True)
    H, _, K = head_dims(cfg)
    return 6 * n + 12 * cfg.n_layer * cfg.block_size * H * K


def matmul_T(x_ND: jax.Array, w_OD: jax.Array) -> jax.Array:
    """x_ND @ w_OD.T in float32, for a weight stored [out, in] as decoding reads it (the output
    layer; the kernels of `jaxgpt.decode.transpose_kernels`). XLA:CPU multiplies a few rows
    fastest with the weight as the left operand, as stored; the barrier keeps XLA from
    folding the transposes back (on the right, it copies the weight's transpose at every
    step). One row on a weight narrower than float32 (bfloat16) goes the other way: XLA:CPU's
    own mat-vec reads it as stored and converts it on the fly, where its library dots run
    bfloat16 ~5x slower than float32. Tying the weight to the row keeps XLA from hoisting
    that conversion out of a decode loop, which would read a float32 copy at every step."""
    if x_ND.shape[0] == 1 and w_OD.dtype != jnp.float32:
        w_OD, x_ND = jax.lax.optimization_barrier((w_OD, x_ND))
        return jnp.matmul(x_ND, w_OD.T, preferred_element_type=jnp.float32)
    return jax.lax.optimization_barrier(jnp.matmul(w_OD, x_ND.T, preferred_element_type=jnp.float32)).T


def _dense(p: dict, x_ND: jax.Array) -> jax.Array:
    if "kernel_T" in p:  # see `jaxgpt.decode.transpose_kernels`
        y = matmul_T(x_ND, p["kernel_T"]).astype(x_ND.dtype)
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


def _rms_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis in float32, returned in the input's dtype."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps) * p["scale"]
    return y.astype(x.dtype)


def norm(p: dict, x_ND: jax.Array, cfg: GPTConfig) -> jax.Array:
    return (_rms_norm if cfg.norm == "rmsnorm" else _layer_norm)(p, x_ND, cfg.layer_norm_eps)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def score_divisor(cfg: GPTConfig, layer: int) -> float:
    """What layer `layer`'s attention scores are divided by, as in transformers' GPT-2."""
    divisor = math.sqrt(head_dims(cfg)[2]) if cfg.scale_attn_weights else 1.0
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


def attention(q_BTHK, k_xSK, v_xSK, divisor: float, rate: float = 0.0, key: jax.Array | None = None,
              mask_B1TS: jax.Array | None = None) -> jax.Array:
    """Softmax attention of scores q·k / `divisor` over S key positions, causal (T = S) or
    where `mask_B1TS` allows (a KV cache's slots, see `jaxgpt.decode`); each of the G
    key/value heads serves H / G query heads. Scores and softmax are float32 whatever the
    inputs' dtype. Keys and values come [B, G, S, K] (training: the heads stay an axis of
    their own, so their split over the `tensor` mesh axis stays as it is) or [B·G, S, K]
    (the KV cache: XLA:CPU's batched dots then read a cache updated in place as it is,
    where from [B, G, S, K] it copied every layer's whole cache at every decode step).
    Without dropout or mask on a GPU, cuDNN's fused attention where it applies."""
    B, T, H, K = q_BTHK.shape
    *lead, S, _ = k_xSK.shape
    G = math.prod(lead) // B
    R = H // G  # query heads per key/value head
    if (key is None or rate == 0.0) and mask_B1TS is None and attention_implementation(q_BTHK) == "cudnn":
        k_BSGK, v_BSGK = (a.reshape(B, G, S, K).transpose(0, 2, 1, 3) for a in (k_xSK, v_xSK))
        return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, scale=1 / divisor, is_causal=True,
                                            implementation="cudnn")
    q_xMK = q_BTHK.reshape(B, T, G, R, K).transpose(0, 2, 3, 1, 4).reshape(*lead, R * T, K)  # M: (R, T)
    s_xMS = jnp.einsum("...mk,...sk->...ms", q_xMK, k_xSK, preferred_element_type=jnp.float32)
    s_BGRTS = s_xMS.reshape(B, G, R, T, S) * jnp.float32(1 / divisor)
    mask_B11TS = jnp.tril(jnp.ones((T, S), bool))[None, None, None] if mask_B1TS is None else mask_B1TS[:, :, None]
    p_BGRTS = jax.nn.softmax(jnp.where(mask_B11TS, s_BGRTS, jnp.finfo(jnp.float32).min), axis=-1)
    p_xMS = _dropout(p_BGRTS, rate, key).astype(v_xSK.dtype).reshape(*lead, R * T, S)
    y_BGRTK = jnp.einsum("...ms,...sk->...mk", p_xMS, v_xSK).reshape(B, G, R, T, K)
    return y_BGRTK.transpose(0, 3, 1, 2, 4).reshape(B, T, H, K)


def _rope(x_BTHK: jax.Array, positions_BT: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding in HF Llama's layout: dim i pairs with dim i + K/2, rotated
    by position · base^(-2i/K). Computed in float32, returned in the input's dtype."""
    K = x_BTHK.shape[-1]
    inv_freq_k = base ** (-jnp.arange(0, K, 2, dtype=jnp.float32) / K)
    angle_BT1k = (positions_BT.astype(jnp.float32)[:, :, None] * inv_freq_k)[:, :, None, :]
    cos, sin = jnp.cos(angle_BT1k), jnp.sin(angle_BT1k)
    x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTHK.dtype)


def qkv(p: dict, x_ND: jax.Array, positions_BT: jax.Array, cfg: GPTConfig) -> tuple[jax.Array, ...]:
    """The block's queries [B, T, H, K], keys and values [B, T, G, K]; under rope, queries
    and keys rotated by `positions_BT`."""
    (B, T), (H, G, K) = positions_BT.shape, head_dims(cfg)
    qkv_N = _dense(p["attn"]["c_attn"], norm(p["ln_1"], x_ND, cfg))
    q_NHK, k_NGK, v_NGK = jnp.split(qkv_N, [H * K, (H + G) * K], axis=-1)
    q_BTHK, k_BTGK, v_BTGK = q_NHK.reshape(B, T, H, K), k_NGK.reshape(B, T, G, K), v_NGK.reshape(B, T, G, K)
    if cfg.qk_norm:
        q_BTHK = _rms_norm(p["attn"]["q_norm"], q_BTHK, cfg.layer_norm_eps)
        k_BTGK = _rms_norm(p["attn"]["k_norm"], k_BTGK, cfg.layer_norm_eps)
    if cfg.pos == "rope":
        q_BTHK, k_BTGK = _rope(q_BTHK, positions_BT, cfg.rope_base), _rope(k_BTGK, positions_BT, cfg.rope_base)
    return q_BTHK, k_BTGK, v_BTGK


_ACTIVATIONS = {
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
}


def _mlp_residual(p: dict, x_ND: jax.Array, cfg: GPTConfig, key: jax.Array | None) -> jax.Array:
    u_ND, mlp = norm(p["ln_2"], x_ND, cfg), p["mlp"]
    if cfg.mlp == "swiglu":
        h_NF = jax.nn.silu(_dense(mlp["c_gate"], u_ND)) * _dense(mlp["c_fc"], u_ND)
    elif cfg.mlp == "relu2":
        h_NF = jnp.square(jax.nn.relu(_dense(mlp["c_fc"], u_ND)))
    else:
        h_NF = _ACTIVATIONS[cfg.activation](_dense(mlp["c_fc"], u_ND))
    return x_ND + _dropout(_dense(mlp["c_proj"], h_NF), cfg.dropout, key)


def block_output(p: dict, x_ND: jax.Array, y_BTHK: jax.Array, cfg: GPTConfig, keys=(None, None)) -> jax.Array:
    """The block after attention: its output projection and residual, then the MLP's
    residual (`keys` turn on their dropout)."""
    x_ND = x_ND + _dropout(_dense(p["attn"]["c_proj"], y_BTHK.reshape(x_ND.shape[0], -1)), cfg.dropout, keys[0])
    return _mlp_residual(p, x_ND, cfg, keys[1])


def _block(p: dict, x_ND: jax.Array, positions_BT, cfg: GPTConfig, layer: int, key: jax.Array | None) -> jax.Array:
    k_attn, *k_resid = jax.random.split(key, 3) if key is not None else (None,) * 3
    q_BTHK, k_BTGK, v_BTGK = qkv(p, x_ND, positions_BT, cfg)
    k_BGTK, v_BGTK = k_BTGK.transpose(0, 2, 1, 3), v_BTGK.transpose(0, 2, 1, 3)
    y_BTHK = attention(q_BTHK, k_BGTK, v_BGTK, score_divisor(cfg, layer), cfg.dropout, k_attn)
    return block_output(p, x_ND, y_BTHK, cfg, k_resid)


# Under remat, a block keeps the outputs of its weight matmuls and recomputes the cheap
# rest (LayerNorm, GELU, attention scores) in the backward pass.
_block_remat = jax.checkpoint(_block, static_argnums=(3, 4),
                              policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def hidden(params: Params, tokens_BT: jax.Array, cfg: GPTConfig, key: jax.Array | None = None, *,
           remat: bool = False) -> jax.Array:
    """Final-norm hidden states [N, D]. `key` turns dropout on (training); `remat`
    recomputes each block's activations in the backward pass instead of storing them."""
    B, T = tokens_BT.shape
    if T > cfg.block_size:
        raise ValueError(f"sequence length {T} exceeds block_size {cfg.block_size}")
    positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    x_BTD = params["wte"][tokens_BT]
    if cfg.pos == "learned":
        x_BTD = x_BTD + params["wpe"][:T]
    keys = jax.random.split(key, cfg.n_layer + 1) if key is not None else [None] * (cfg.n_layer + 1)
    x_ND = _dropout(x_BTD.reshape(B * T, -1), cfg.dropout, keys[0])
    block = _block_remat if remat else _block
    for layer, (p_block, k) in enumerate(zip(params["h"], keys[1:])):
        x_ND = block(p_block, x_ND, positions_BT, cfg, layer, k)
    return norm(params["ln_f"], x_ND, cfg)


def forward(params: Params, tokens_BT: jax.Array, cfg: GPTConfig, key: jax.Array | None = None) -> jax.Array:
    """Logits float32 [B, T, V] for int tokens [B, T]."""
    B, T = tokens_BT.shape
    return logits(params, hidden(params, tokens_BT, cfg, key), cfg).reshape(B, T, -1)


def output_embedding(params: Params) -> jax.Array:
    """The output layer [V, D]: `lm_head` where the model has one, else the token embedding (tied)."""
    return params["lm_head"] if "lm_head" in params else params["wte"]


def softcap(logits_NV: jax.Array, cfg: GPTConfig) -> jax.Array:
    c = cfg.logit_softcap
    return logits_NV if c is None else c * jnp.tanh(logits_NV / c)


def logits(params: Params, h_ND: jax.Array, cfg: GPTConfig) -> jax.Array:
    """Float32 logits [N, V] of final hidden states [N, D]."""
    return softcap(jnp.matmul(h_ND, output_embedding(params).T, preferred_element_type=jnp.float32), cfg)


def loss_fn(params: Params, tokens_BT, targets_BT, cfg: GPTConfig, key=None, mask_BT=None, *,
            remat: bool = False) -> jax.Array:
    """Mean next-token cross-entropy; `mask_BT` (0/1) leaves positions out of the mean."""
    logits_NV = logits(params, hidden(params, tokens_BT, cfg, key, remat=remat), cfg)
    logz_N = jax.nn.logsumexp(logits_NV, axis=-1)
    target_logit_N = jnp.take_along_axis(logits_NV, targets_BT.reshape(-1, 1), axis=-1)[:, 0]
    nll_N = logz_N - target_logit_N
    if mask_BT is None:
        return nll_N.mean()
    mask_N = mask_BT.reshape(-1).astype(nll_N.dtype)
    return (nll_N * mask_N).sum() / jnp.maximum(mask_N.sum(), 1.0)

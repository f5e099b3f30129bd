"""The modern switches of GPTConfig against a NumPy transformer written from the papers'
formulas (float64, heads looped, keys and values repeated for GQA), KV-cache generation
against full recomputation (Muon is checked against its formula in tests/test_schedules.py).

RoPE, RMSNorm, SwiGLU, GQA and QK-norm are also checked against transformers' Llama and
Qwen3 in tests/test_hf_modern.py."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import decode, model
from jaxgpt.config import ConfigError, GPTConfig
from jaxgpt.generate import generate

BASE = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, vocab_size=61, bias=False)
VARIANTS = {
    "rope": dict(pos="rope", rope_base=500.0),
    "rmsnorm": dict(norm="rmsnorm"),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(mlp="relu2"),
    "swiglu": dict(mlp="swiglu", n_inner=48),
    "gqa": dict(n_kv_head=2),
    "mqa_head_dim": dict(n_kv_head=1, head_dim=12, pos="rope"),
    "untied": dict(tie_embeddings=False),
    "softcap": dict(logit_softcap=3.0),
    "all": dict(pos="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", n_kv_head=2, tie_embeddings=False,
                logit_softcap=10.0, bias=True, n_inner=40),
}


def _greedy_full(params, cfg: GPTConfig, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens, each from a full forward of the whole sequence so far (padded to
    block_size at the end, which causal attention never sees: one compiled forward)."""
    forward = jax.jit(model.forward, static_argnums=2)
    seq = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, cfg.block_size), np.int32)
        padded[0, :len(seq)] = seq
        seq.append(int(jnp.argmax(forward(params, padded, cfg)[0, len(seq) - 1])))
    return seq[len(prompt):]


def _cfg(name: str) -> GPTConfig:
    return dataclasses.replace(BASE, **VARIANTS[name])


def _params(cfg: GPTConfig, seed: int = 0) -> dict:
    """Random params with every leaf non-trivial (scales and biases too), so that no switch hides."""
    params = model.init_params(cfg, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _np_norm(x, p, cfg, rms=None):
    rms = cfg.norm == "rmsnorm" if rms is None else rms
    if rms:
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + cfg.layer_norm_eps) * p["scale"]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    y = (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * p["scale"]
    return y + p["bias"] if "bias" in p else y


def _np_rope(x_TK, base):
    """Rotary embedding as Su et al. define it, on pairs (i, i + K/2) as Llama lays them out."""
    T, K = x_TK.shape
    out = np.empty_like(x_TK)
    for t in range(T):
        for i in range(K // 2):
            a = t * base ** (-2 * i / K)
            x1, x2 = x_TK[t, i], x_TK[t, i + K // 2]
            out[t, i], out[t, i + K // 2] = x1 * math.cos(a) - x2 * math.sin(a), x2 * math.cos(a) + x1 * math.sin(a)
    return out


def _np_dense(p, x):
    return x @ p["kernel"] + (p["bias"] if "bias" in p else 0)


def _np_forward(params, tokens_T, cfg: GPTConfig):
    """Logits [T, V] of one sequence, in float64."""
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    H, G = cfg.n_head, cfg.n_kv_head or cfg.n_head
    K = cfg.head_dim or cfg.n_embd // cfg.n_head
    T = len(tokens_T)
    x = params["wte"][tokens_T] + (params["wpe"][:T] if cfg.pos == "learned" else 0)
    for p in params["h"]:
        qkv = _np_dense(p["attn"]["c_attn"], _np_norm(x, p["ln_1"], cfg))
        q, k, v = qkv[:, :H * K], qkv[:, H * K:(H + G) * K], qkv[:, (H + G) * K:]
        heads = []
        for h in range(H):
            g = h // (H // G)
            qh, kh, vh = q[:, h * K:(h + 1) * K], k[:, g * K:(g + 1) * K], v[:, g * K:(g + 1) * K]
            if cfg.qk_norm:
                qh, kh = _np_norm(qh, p["attn"]["q_norm"], cfg, True), _np_norm(kh, p["attn"]["k_norm"], cfg, True)
            if cfg.pos == "rope":
                qh, kh = _np_rope(qh, cfg.rope_base), _np_rope(kh, cfg.rope_base)
            s = qh @ kh.T / math.sqrt(K) + np.triu(np.full((T, T), -np.inf), 1)
            w = np.exp(s - s.max(-1, keepdims=True))
            heads.append((w / w.sum(-1, keepdims=True)) @ vh)
        x = x + _np_dense(p["attn"]["c_proj"], np.concatenate(heads, -1))
        u = _np_norm(x, p["ln_2"], cfg)
        if cfg.mlp == "swiglu":
            gate = _np_dense(p["mlp"]["c_gate"], u)
            hid = gate / (1 + np.exp(-gate)) * _np_dense(p["mlp"]["c_fc"], u)
        elif cfg.mlp == "relu2":
            hid = np.maximum(_np_dense(p["mlp"]["c_fc"], u), 0) ** 2
        else:
            a = _np_dense(p["mlp"]["c_fc"], u)
            hid = 0.5 * a * (1 + np.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
        x = x + _np_dense(p["mlp"]["c_proj"], hid)
    logits = _np_norm(x, params["ln_f"], cfg) @ params.get("lm_head", params["wte"]).T
    c = cfg.logit_softcap
    return logits if c is None else c * np.tanh(logits / c)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_switch_matches_numpy_reference(name):
    cfg = _cfg(name)
    params = _params(cfg)
    tokens_BT = np.asarray(jax.random.randint(jax.random.key(2), (2, 11), 0, cfg.vocab_size))
    got_BTV = np.asarray(model.forward(params, jnp.asarray(tokens_BT), cfg))
    for b in range(2):
        want = _np_forward(params, tokens_BT[b], cfg)
        np.testing.assert_allclose(got_BTV[b], want, atol=2e-4 * max(1.0, np.abs(want).max()))


def test_defaults_are_gpt2():
    """The default switches are GPT-2's: the param tree and forward are what they were."""
    cfg = BASE
    params = _params(cfg)
    assert set(params) == {"wte", "wpe", "h", "ln_f"}
    assert set(params["h"][0]["mlp"]) == {"c_fc", "c_proj"} and set(params["h"][0]["attn"]) == {"c_attn", "c_proj"}
    tokens_T = np.arange(9) % cfg.vocab_size
    np.testing.assert_allclose(np.asarray(model.forward(params, jnp.asarray(tokens_T[None]), cfg))[0],
                               _np_forward(params, tokens_T, cfg), atol=2e-4)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_generation_equals_full_recompute(name):
    """Greedy decoding through the KV cache picks what argmax over a full forward of the
    growing sequence picks, for prompts of different lengths in one batch."""
    cfg = _cfg(name)
    params = _params(cfg, seed=3)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    got = generate(params, cfg, prompts, max_new_tokens=9, temperature=0)
    for prompt, new in zip(prompts, got):
        assert new == _greedy_full(params, cfg, prompt, 9)


def test_rope_cache_slides_past_block_size():
    """Past block_size a rope model attends to the last block_size tokens at their own
    positions: the wrapped cache equals a cache long enough never to wrap."""
    cfg = _cfg("all")
    params = _params(cfg, seed=4)
    prompt, n_new = [3, 1, 4, 1, 5], 3 * cfg.block_size
    got = generate(params, cfg, [prompt], max_new_tokens=n_new, temperature=0)[0]
    seq = list(prompt)
    forward_cached = jax.jit(decode.forward, static_argnums=5)
    cache = decode.init_cache(cfg, 1, len(prompt) + n_new)
    logits, cache = forward_cached(params, jnp.asarray([seq]), jnp.arange(len(seq))[None], cache, 0, cfg)
    for _ in range(n_new):
        seq.append(int(jnp.argmax(logits[0, -1])))
        logits, cache = forward_cached(params, jnp.asarray([seq[-1:]]), jnp.asarray([[len(seq) - 1]]), cache,
                                       len(seq) - 1, cfg)
    assert got == seq[len(prompt):]
    # Within block_size the window is the whole sequence: the first tokens equal full recompute.
    n_within = cfg.block_size - len(prompt)
    assert got[:n_within] == _greedy_full(params, cfg, prompt, n_within)


def test_zero_init_projections():
    cfg = dataclasses.replace(_cfg("untied"), zero_init_proj=True)
    params = model.init_params(cfg, jax.random.key(0))
    zeros = [params["lm_head"]] + [b[part]["c_proj"]["kernel"] for b in params["h"] for part in ("attn", "mlp")]
    assert all(not np.any(np.asarray(z)) for z in zeros)
    assert np.std(np.asarray(params["h"][0]["attn"]["c_attn"]["kernel"])) > 0.01


def test_bad_switches_are_one_line_errors():
    with pytest.raises(ConfigError, match="n_kv_head 3 must divide model.n_head 4"):
        dataclasses.replace(BASE, n_kv_head=3)
    with pytest.raises(ConfigError, match="n_embd 30 is not a multiple of model.n_head 4"):
        dataclasses.replace(BASE, n_embd=30)
    with pytest.raises(ConfigError, match="make the head width .* even"):
        dataclasses.replace(BASE, pos="rope", head_dim=7)

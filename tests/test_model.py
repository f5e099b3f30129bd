import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxgpt import model
from jaxgpt.config import GPTConfig

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, bias=False)


def test_param_count_matches_abstract_tree_and_gpt2():
    params = model.init_params(CFG, jax.random.key(0))
    abstract = model.abstract_params(CFG)
    assert jax.tree.structure(params) == jax.tree.structure(abstract)
    assert model.count_params(params) == model.count_params(abstract)
    # the published size of GPT-2 small, from shapes alone
    assert model.count_params(model.abstract_params(GPTConfig())) == 124_439_808


def test_causal():
    params = model.init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
    t = 9
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % CFG.vocab_size)
    a, b = model.forward(params, tokens, CFG), model.forward(params, changed, CFG)
    np.testing.assert_array_equal(np.asarray(a[:, :t]), np.asarray(b[:, :t]))
    assert not np.allclose(np.asarray(a[:, t:]), np.asarray(b[:, t:]))


def test_loss_at_init_is_about_log_vocab():
    params = model.init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, CFG.vocab_size)
    loss = float(model.loss_fn(params, tokens, jnp.roll(tokens, -1, axis=1), CFG))
    assert abs(loss - math.log(CFG.vocab_size)) < 0.1


def test_masked_loss_is_mean_over_kept_positions():
    params = model.init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
    targets = jnp.roll(tokens, -1, axis=1)
    logp = jax.nn.log_softmax(model.forward(params, tokens, CFG))
    nll = -np.take_along_axis(np.asarray(logp), np.asarray(targets)[..., None], -1)[..., 0]
    mask = np.zeros((2, 16), np.int32)
    mask[0, :5] = 1
    mask[1, 3:7] = 1
    got = float(model.loss_fn(params, tokens, targets, CFG, mask_BT=jnp.asarray(mask)))
    np.testing.assert_allclose(got, nll[mask == 1].mean(), rtol=1e-5)


@pytest.mark.parametrize("G", [4, 2])  # key/value heads for 4 query heads
@pytest.mark.parametrize("merged", [False, True])  # keys and values [B, G, S, K] or (the cache's) [B·G, S, K]
def test_attention_equals_plain_softmax_attention(G, merged):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(k1, (2, 16, 4, 8))
    k, v = (jax.random.normal(kk, (2, 16, G, 8)) for kk in (k2, k3))
    k_xSK, v_xSK = (a.transpose(0, 2, 1, 3) for a in (k, v))
    if merged:
        k_xSK, v_xSK = (a.reshape(2 * G, 16, 8) for a in (k_xSK, v_xSK))
    fused = model.attention(q, k_xSK, v_xSK, math.sqrt(8))
    k, v = jnp.repeat(k, 4 // G, axis=2), jnp.repeat(v, 4 // G, axis=2)  # query head h uses key head h // (4 / G)
    s = jnp.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(8)
    s = jnp.where(jnp.tril(jnp.ones((16, 16), bool)), s, -jnp.inf)
    plain = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(s, -1), v)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(plain), atol=1e-5)


def test_dropout_only_with_a_key():
    cfg = GPTConfig(**{**CFG.__dict__, "dropout": 0.5})
    params = model.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    plain = model.forward(params, tokens, cfg)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(model.forward(params, tokens, CFG)))
    d1 = model.forward(params, tokens, cfg, jax.random.key(2))
    d2 = model.forward(params, tokens, cfg, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))
    assert not np.allclose(np.asarray(d1), np.asarray(plain))


def test_tiny_batch_overfits():
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=65, bias=True)
    params = model.init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, cfg.vocab_size)
    x, y = tokens[:, :-1], tokens[:, 1:]
    opt = optax.adam(3e-3)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(model.loss_fn)(params, x, y, cfg)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    for _ in range(300):
        params, state, loss = step(params, state)
    assert float(loss) < 0.1


def test_dropout_and_remat_paths_honour_the_config_options():
    """The attention written out for dropout, and remat, compute what the fused forward does."""
    cfg = dataclasses.replace(CFG, n_inner=40, activation="relu", layer_norm_eps=1e-3, scale_attn_weights=False,
                              scale_attn_by_inverse_layer_idx=True, dropout=1e-9)  # dropout that keeps everything
    leaves, tree = jax.tree.flatten(model.init_params(cfg, jax.random.key(0)))
    params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(jax.random.key(i), x.shape)
                                       for i, x in enumerate(leaves)])
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    plain = model.forward(params, tokens, cfg)
    np.testing.assert_allclose(model.forward(params, tokens, cfg, jax.random.key(2)), plain, atol=1e-5)
    default = model.forward(params, tokens, dataclasses.replace(cfg, activation="gelu_new"))
    assert not np.allclose(default, plain, atol=1e-3)  # the options matter for these weights

    def grads(key, remat):
        return jax.jit(jax.grad(model.loss_fn), static_argnums=3, static_argnames="remat")(
            params, tokens, jnp.roll(tokens, -1, axis=1), cfg, key, remat=remat)

    want = grads(None, False)
    for key, remat in [(None, True), (jax.random.key(2), False), (jax.random.key(2), True)]:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), grads(key, remat), want)


def test_attention_falls_back_to_xla_where_cudnn_cannot_run(monkeypatch):
    """On a backend that claims to be a GPU but cannot build cuDNN's attention (this CPU),
    the forward falls back to XLA's attention and gives the same logits."""

    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.0)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), model.init_params(cfg, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 65)
    expected = model.forward(params, tokens, cfg)
    q = jnp.zeros((2, 16, 2, 16), jnp.bfloat16)
    assert model.attention_implementation(q) is None  # a CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert model.attention_implementation(q) is None  # cuDNN's attention does not compile here
    assert model.attention_implementation(q.astype(jnp.float32)) is None  # float32: never cuDNN
    np.testing.assert_array_equal(model.forward(params, tokens, cfg), expected)

"""Generation against independent references: full recomputation with `model.forward`
(cropped to block_size as nanoGPT does), each row generated alone, and numpy filters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import decode, model
from jaxgpt.config import GPTConfig
from jaxgpt.decode import filter_logits
from jaxgpt.generate import generate, generate_stream, stream_text

CHAR = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=65, dropout=0.0, bias=False)
GPT2 = GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=50257, dropout=0.0, bias=True)
# Row 2 starts near block_size and passes it, so the sliding window is exercised.
PROMPTS = [[1, 2, 3], [5, 8, 13, 21, 34, 55, 1, 4, 9, 16, 25], list(range(40, 60)) + [7]]


@functools.cache
@functools.partial(jax.jit, static_argnums=0)
def _params(cfg: GPTConfig):
    """Random weights far from the near-uniform init, so greedy text is not one repeated token."""
    params = model.init_params(cfg, jax.random.key(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _greedy_by_recomputation(cfg, prompt, n):
    """nanoGPT's loop: crop to the last block_size tokens, run the full model, take argmax."""
    params = _params(cfg)
    forward = jax.jit(model.forward, static_argnums=2)
    seq = list(prompt)
    for _ in range(n):
        window = seq[-cfg.block_size :]
        tokens = np.zeros((1, cfg.block_size), np.int32)  # right padding: causal, so unseen
        tokens[0, : len(window)] = window
        seq.append(int(np.argmax(forward(params, jnp.asarray(tokens), cfg)[0, len(window) - 1])))
    return seq[len(prompt) :]


@pytest.mark.parametrize("cfg", [CHAR, GPT2], ids=["char", "gpt2"])
def test_greedy_with_cache_equals_recomputation(cfg):
    out = generate(_params(cfg), cfg, PROMPTS, max_new_tokens=16, temperature=0)
    for prompt, row in zip(PROMPTS, out):
        assert row == _greedy_by_recomputation(cfg, prompt, 16)
    assert len(set(sum(out, []))) > 5  # the weights give varied text


def test_cache_growth_equals_recomputation():
    """Prompt bucket 16: the cache starts at 32 slots, grows to 128, then to 16 + 256 = 272."""
    cfg = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=256, vocab_size=65, dropout=0.0, bias=False)
    prompts = PROMPTS[:2] + [[9] * 16]
    out = generate(_params(cfg), cfg, prompts, max_new_tokens=140, temperature=0)
    for prompt, row in zip(prompts, out):
        assert row == _greedy_by_recomputation(cfg, prompt, 140)


def test_ragged_rows_equal_rows_generated_alone():
    cfg, params = CHAR, _params(CHAR)
    batch = generate(params, cfg, PROMPTS, max_new_tokens=16, temperature=0)
    for prompt, row in zip(PROMPTS, batch):
        assert generate(params, cfg, [prompt], max_new_tokens=16, temperature=0) == [row]


def test_sampling_is_reproducible_and_independent_of_batch_padding():
    cfg, params = CHAR, _params(CHAR)
    kw = dict(max_new_tokens=16, temperature=1.0, top_k=20, top_p=0.9)
    three = generate(params, cfg, PROMPTS, seed=7, **kw)  # batch bucket 4
    five = generate(params, cfg, PROMPTS + [[3], [4, 4]], seed=7, **kw)  # batch bucket 8
    assert five[:3] == three
    assert generate(params, cfg, PROMPTS, seed=7, **kw) == three
    assert generate(params, cfg, PROMPTS, seed=8, **kw) != three


def test_top_k_1_equals_greedy():
    cfg, params = GPT2, _params(GPT2)
    greedy = generate(params, cfg, PROMPTS, max_new_tokens=16, temperature=0)
    assert generate(params, cfg, PROMPTS, max_new_tokens=16, temperature=0.8, top_k=1, seed=3) == greedy


def _kept_by_nucleus(probs, p):
    """The smallest set of most likely tokens whose probability reaches p."""
    kept, mass = set(), 0.0
    for i in np.argsort(-probs, kind="stable"):
        kept.add(int(i))
        mass += probs[i]
        if mass >= p:
            return kept
    return kept


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([0.05, 0.5, 0.1, 0.2, 0.15])
    logits_1V = jnp.log(jnp.asarray(probs, jnp.float32))[None]
    for p, expected in [(0.45, {1}), (0.65, {1, 3}), (0.8, {1, 3, 4}), (0.9, {1, 3, 4, 2}), (1.0, {0, 1, 2, 3, 4})]:
        assert _kept_by_nucleus(probs, p) == expected  # the reference agrees with the hand count
        kept = np.flatnonzero(np.isfinite(filter_logits(logits_1V, 1.0, top_p=p)[0]))
        assert set(kept.tolist()) == expected, p
    # top-k first, then top-p on the renormalised top-k mass: 0.5/0.7 = 0.71 < 0.75 keeps two.
    kept = np.isfinite(filter_logits(logits_1V, 1.0, top_k=2, top_p=0.75)[0])
    assert set(np.flatnonzero(kept).tolist()) == {1, 3}
    # Temperature first: at T=2 the distribution flattens and the nucleus grows.
    flat = np.exp(np.log(probs) / 2) / np.exp(np.log(probs) / 2).sum()
    kept = np.isfinite(filter_logits(logits_1V, 2.0, top_p=0.65)[0])
    assert set(np.flatnonzero(kept).tolist()) == _kept_by_nucleus(flat, 0.65) == {1, 3, 4}


def test_top_p_on_random_rows_matches_reference():
    logits_BV = 3 * jax.random.normal(jax.random.key(2), (6, 97))
    for p in (0.3, 0.7, 0.95):
        filtered = np.asarray(filter_logits(logits_BV, 1.0, top_p=p))
        for row, logits in zip(filtered, np.asarray(logits_BV, np.float64)):
            probs = np.exp(logits - logits.max())
            assert set(np.flatnonzero(np.isfinite(row)).tolist()) == _kept_by_nucleus(probs / probs.sum(), p)


def test_top_k_holds_when_top_p_is_one():
    """top_p=1.0 keeps what top-k keeps: the float32 sum of the probabilities may never reach
    1.0, which once kept all of GPT-2's 50,257 tokens."""
    logits_BV = 3 * jax.random.normal(jax.random.key(4), (4, 50257))
    for top_k in (1, 50):
        kept_B = np.isfinite(np.asarray(filter_logits(logits_BV, 1.0, top_k=top_k, top_p=1.0))).sum(-1)
        assert kept_B.tolist() == [top_k] * 4


def test_varied_requests_in_one_bucket_compile_once():
    cfg, params = GPT2, _params(GPT2)
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        # prompt lengths 9..16 -> bucket 16; batches 3, 4 -> 4; new tokens 5..16 -> 16.
        generate(params, cfg, [[1] * 9, [2] * 12, [3] * 16], max_new_tokens=5, temperature=0.5, seed=0)
        first = len(compiles)
        generate(params, cfg, [[4] * 10, [5] * 16, [6] * 13, [7] * 9], max_new_tokens=16, temperature=0.9, seed=1)
        generate(params, cfg, [[8] * 15, [9] * 11, [1] * 14], max_new_tokens=9, temperature=1.0, seed=2)
        again = len(compiles) - first
        generate(params, cfg, [[1] * 17], max_new_tokens=5, temperature=0.5)  # prompt bucket 32
        other_bucket = len(compiles) - first - again
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert first >= 1 and again == 0 and other_bucket >= 1


def test_stop_tokens_end_only_their_row():
    cfg, params = CHAR, _params(CHAR)
    free = generate(params, cfg, PROMPTS, max_new_tokens=16, temperature=0)
    stop = next(t for t in free[1][1:] if t not in free[0])  # ends row 1 but never row 0
    stopped = generate(params, cfg, PROMPTS, max_new_tokens=16, temperature=0, stop_tokens=[stop])
    for free_row, row in zip(free, stopped):
        expected = free_row[: free_row.index(stop) + 1] if stop in free_row else free_row
        assert row == expected
    assert len(stopped[1]) < 16 and stopped[0] == free[0]


def test_stream_yields_the_same_tokens_as_generate():
    cfg, params = CHAR, _params(CHAR)
    kw = dict(max_new_tokens=16, temperature=0.9, top_k=10, seed=5)
    rows = [[] for _ in PROMPTS]
    chunks = list(generate_stream(params, cfg, PROMPTS, chunk_tokens=6, **kw))
    for chunk in chunks:
        for row, new in zip(rows, chunk):
            row.extend(new)
    assert rows == generate(params, cfg, PROMPTS, **kw)
    assert [len(c[0]) for c in chunks] == [1, 6, 6, 3]


def test_stream_text_never_splits_a_utf8_character():
    class ByteTokenizer:  # one byte per token, like BPE's byte fallback
        def decode_bytes(self, ids):
            return bytes(ids)

    text = ["né à Zürich €", "ok"]
    ids = [list(t.encode()) for t in text]
    chunks = [[row[i : i + 1] for row in ids] for i in range(max(map(len, ids)))]
    pieces = list(stream_text(chunks, ByteTokenizer()))
    assert all("\ufffd" not in p for chunk in pieces for p in chunk)
    assert ["".join(p[i] for p in pieces) for i in range(2)] == text


@pytest.mark.parametrize("transposed", [False, True], ids=["kernel", "kernel_T"])
def test_forward_cached_equals_forward(transposed):
    cfg, params = GPT2, _params(GPT2)
    tokens_BT = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.vocab_size)
    positions_BT = jnp.broadcast_to(jnp.arange(12), (2, 12))
    expected = jax.jit(model.forward, static_argnums=2)(params, tokens_BT, cfg)
    if transposed:
        params = decode.transpose_kernels(params)
    forward_cached = jax.jit(decode.forward, static_argnums=5)
    cache = decode.init_cache(cfg, 2, 16)
    first, cache = forward_cached(params, tokens_BT[:, :7], positions_BT[:, :7], cache, 0, cfg)
    rest, cache = forward_cached(params, tokens_BT[:, 7:], positions_BT[:, 7:], cache, 7, cfg)
    np.testing.assert_allclose(np.concatenate([first, rest], axis=1), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts=[]), "no prompts"),
        (dict(prompts=[[1], []]), "prompt 1 is empty"),
        (dict(prompts=[[1, 99]]), "prompt 0 has token ids outside"),
        (dict(max_new_tokens=0), "max_new_tokens is 0"),
        (dict(temperature=-1.0), "temperature is -1.0"),
        (dict(top_k=0), "top_k is 0"),
        (dict(top_p=0.0), "top_p is 0.0"),
        (dict(top_p=1.5), "top_p is 1.5"),
        (dict(stop_tokens=[65]), "stop_tokens"),
    ],
)
def test_user_errors_name_the_problem(kwargs, message):
    args = dict(prompts=[[1, 2]], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(_params(CHAR), CHAR, **args)


def test_bfloat16_params_keep_a_bfloat16_cache():
    """The cache takes the compute dtype: with bfloat16 params, half the bytes per slot; the
    cached logits are float32 and the bfloat16 full forward's (within bfloat16 rounding)."""
    cfg = CHAR
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params(cfg))
    tokens_BT = jax.random.randint(jax.random.key(3), (2, 12), 0, cfg.vocab_size)
    positions_BT = jnp.broadcast_to(jnp.arange(12), (2, 12))
    cache = decode.init_cache(cfg, 2, 16, params["wte"].dtype)
    logits, cache = jax.jit(decode.forward, static_argnums=5)(params, tokens_BT, positions_BT, cache, 0, cfg)
    assert all(a.dtype == jnp.bfloat16 for a in cache["k_NSK"] + cache["v_NSK"]) and logits.dtype == jnp.float32
    expected = jax.jit(model.forward, static_argnums=2)(params, tokens_BT, cfg)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=0.15, rtol=0.05)


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("cfg", [CHAR, GPT2], ids=["char", "gpt2"])
def test_bfloat16_greedy_equals_argmax_of_forward(cfg, rows):
    """Greedy generation on bfloat16 params picks, at every step, the argmax of the full
    bfloat16 forward over the tokens so far (attention scores, softmax and logits float32
    on both paths). One row takes XLA:CPU's own mat-vec (`model.matmul_T`)."""
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params(cfg))
    prompts = PROMPTS[:rows]
    out = generate(params, cfg, prompts, max_new_tokens=12, temperature=0)
    for prompt, new in zip(prompts, out):
        seq = np.array([prompt + new], np.int32)
        logits_TV = jax.jit(model.forward, static_argnums=2)(params, seq, cfg)[0]
        assert logits_TV.dtype == jnp.float32
        assert np.argmax(np.asarray(logits_TV[len(prompt) - 1 : -1]), axis=-1).tolist() == new

"""Generation: prefill the prompts in one call, then decode in compiled loops over a KV cache.

The rows of a batch are left-padded to a common length, so every row writes the same cache
slot at each step; padding has negative positions, which attention never sees. Prompt length,
batch size and the number of new tokens are rounded up to powers of two ("buckets"), so a
stream of varied requests reuses compiled code instead of compiling for each one.

Attention reads every slot of the cache, filled or not, so the cache starts at twice the
prompt bucket and grows fourfold whenever it fills, rather than holding every slot a request
may need from the start (fourfold rather than double: each cache size is one more compiled
decoding loop, shared by all requests that reach it).

Contexts longer than block_size slide: the model sees the last block_size tokens. With
rotary positions the cache itself slides (it wraps around once it holds block_size slots;
a token's key never changes, so nothing is recomputed). With a learned position table a
sliding cache cannot give that (every token's position shifts by one each step), so once a
row passes block_size each step recomputes the cropped window at positions
0..block_size-1 in full, exactly as nanoGPT does.
"""

import codecs
import functools
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import model
from jaxgpt.config import GPTConfig
from jaxgpt.errors import UserError


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """The shape bucket of `n`: the next power of two, at least `minimum`."""
    return max(minimum, 1 << (n - 1).bit_length())


def filter_logits(logits_BV: jax.Array, temperature, top_k=None, top_p=None) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus): logits outside the kept set become -inf.

    Top-p keeps the smallest set of most likely tokens whose probability reaches `top_p`,
    measured after top-k. Tokens tied with the last one kept are kept too.
    """
    logits_BV = logits_BV / temperature
    if top_k is None and top_p is None:
        return logits_BV
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)
    cutoff_B1 = jnp.full(logits_BV.shape[:-1] + (1,), -jnp.inf, logits_BV.dtype)
    if top_k is not None:
        cutoff_B1 = jnp.take_along_axis(sorted_BV, jnp.reshape(top_k - 1, (1, 1)), axis=-1)
        sorted_BV = jnp.where(sorted_BV >= cutoff_B1, sorted_BV, -jnp.inf)
    if top_p is not None:
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        n_keep_B1 = jnp.sum(mass_before_BV < top_p, axis=-1, keepdims=True)
        # Float32 sums of probabilities may stay below 1.0 to the last token: the top-k
        # cutoff still holds then.
        cutoff_B1 = jnp.maximum(cutoff_B1, jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1))
    return jnp.where(logits_BV >= cutoff_B1, logits_BV, -jnp.inf)


def _next_tokens(logits_BV, step, sampling: dict, sampler: tuple) -> jax.Array:
    """The tokens picked at new-token index `step`. Each row's key comes from (seed, row,
    step), so a row's text does not depend on how many rows pad the batch."""
    greedy, use_top_k, use_top_p = sampler
    if greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = filter_logits(
        logits_BV,
        sampling["temperature"],
        sampling["top_k"] if use_top_k else None,
        sampling["top_p"] if use_top_p else None,
    )
    seed_key = jax.random.key(sampling["seed"])
    keys_B = jax.vmap(lambda row: jax.random.fold_in(jax.random.fold_in(seed_key, row), step))(
        jnp.arange(logits_BV.shape[0])
    )
    return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)


def _advance(state: dict, logits_BV, sampling: dict, sampler: tuple) -> dict:
    """Picks the next token of every row, appends it, and marks rows that hit a stop token."""
    step, done_B = state["step"], state["done_B"]
    tok_B = _next_tokens(logits_BV, step, sampling, sampler)
    at = (0, state["prompt_slots"] + step)
    tokens_BS = jax.lax.dynamic_update_slice(state["tokens_BS"], tok_B[:, None], at)
    return state | {
        "tokens_BS": tokens_BS,
        "len_B": state["len_B"] + 1,
        "n_new_B": jnp.where(done_B, state["n_new_B"], step + 1),
        "done_B": done_B | jnp.any(tok_B[:, None] == sampling["stop_ids"][None, :], axis=-1),
        "step": step + 1,
    }


def last_logits(params, h_ND, B: int, cfg: GPTConfig) -> jax.Array:
    """Float32 logits [B, V] of each row's last position."""
    h_BD, head_VD = h_ND.reshape(B, -1, h_ND.shape[-1])[:, -1], model.output_embedding(params)
    if B == 1:
        return model.softcap(jnp.matmul(h_BD, head_VD.T, preferred_element_type=jnp.float32), cfg)
    # As in model.transpose_kernels: a few rows go ~1.7x faster with the weight on the left.
    logits_VB = jnp.matmul(head_VD, h_BD.T, preferred_element_type=jnp.float32)
    return model.softcap(jax.lax.optimization_barrier(logits_VB).T, cfg)


def _max_slots(P: int, n_new: int, cfg: GPTConfig) -> int:
    """Cache slots a request can fill: with learned positions the cached phase ends before any
    row passes block_size; under rope these slots (>= block_size once a row can pass it) are the ring."""
    return P + min(n_new, cfg.block_size)


@functools.partial(jax.jit, static_argnames=("cfg", "n_new", "sampler"))
def _prefill(params, prompt_BP, plen_B, live_B, sampling, cfg: GPTConfig, n_new: int, sampler):
    """Runs the left-padded prompts through the model in one call and picks the first token."""
    B, P = prompt_BP.shape
    pos_BP = jnp.arange(P)[None, :] - (P - plen_B)[:, None]
    cache = model.init_cache(cfg, B, min(2 * P, _max_slots(P, n_new, cfg)), params["wte"].dtype)
    h_ND, cache = model.hidden_cached(params, prompt_BP, pos_BP, cache, cfg)
    state = {
        "cache": cache,
        "tokens_BS": jnp.concatenate([prompt_BP, jnp.zeros((B, n_new), jnp.int32)], axis=1),
        "prompt_slots": jnp.int32(P),
        "len_B": plen_B,
        "n_new_B": jnp.zeros((B,), jnp.int32),
        "done_B": ~live_B,
        "step": jnp.zeros((), jnp.int32),
    }
    return _advance(state, last_logits(params, h_ND, B, cfg), sampling, sampler)


@functools.partial(jax.jit, static_argnames=("cfg", "sampler"), donate_argnames=("state",))
def _decode(params, state, until, sampling, cfg: GPTConfig, sampler):
    """Decodes until `until` new tokens, every row is done, or the cache is full, in compiled
    loops: one over the cache while every live row fits in block_size (under rope: always,
    the cache sliding once it holds block_size slots), then one over cropped windows."""
    B, S = state["tokens_BS"].shape
    P = state["prompt_slots"]
    bs, slots = cfg.block_size, state["cache"]["pos_BS"].shape[1]
    slides = cfg.pos == "rope" and slots >= bs

    def running(s):
        return (s["step"] < until) & ~jnp.all(s["done_B"])

    def in_block(s):
        return jnp.all(s["done_B"] | (s["len_B"] <= bs))

    def fits(s):
        if slides:
            return running(s)
        return running(s) & in_block(s) & (s["cache"]["index"] < slots)

    def cached_step(s):
        last_B1 = jax.lax.dynamic_slice_in_dim(s["tokens_BS"], P + s["step"] - 1, 1, axis=1)
        h_ND, cache = model.hidden_cached(params, last_B1, s["len_B"][:, None] - 1, s["cache"], cfg)
        return _advance(s | {"cache": cache}, last_logits(params, h_ND, B, cfg), sampling, sampler)

    def window_step(s):
        window_BW = jax.lax.dynamic_slice_in_dim(s["tokens_BS"], P + s["step"] - bs, bs, axis=1)
        pos_BW = jnp.arange(bs)[None, :] - jnp.maximum(bs - s["len_B"], 0)[:, None]
        h_ND, _ = model.hidden_cached(params, window_BW, pos_BW, model.init_cache(cfg, B, bs, params["wte"].dtype), cfg)
        return _advance(s, last_logits(params, h_ND, B, cfg), sampling, sampler)

    state = jax.lax.while_loop(fits, cached_step, state)
    if S > bs and cfg.pos == "learned":  # otherwise no row outgrows block_size, or the cache slides
        state = jax.lax.while_loop(lambda s: running(s) & ~in_block(s), window_step, state)
    return state


@functools.partial(jax.jit, static_argnames=("slots",))
def _grow_cache(state, slots: int):
    return state | {"cache": model.grow_cache(state["cache"], slots)}


_transpose_kernels = jax.jit(model.transpose_kernels)


class GenerateError(UserError):
    """A request generate cannot serve: the message names the argument and the fix."""


def _check(cfg: GPTConfig, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens):
    if not prompts:
        raise GenerateError("no prompts: pass a list of prompts, each a list of token ids")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerateError(f"prompt {i} is empty: give it at least one token (e.g. a newline or end-of-text)")
        if min(prompt) < 0 or max(prompt) >= cfg.vocab_size:
            raise GenerateError(f"prompt {i} has token ids outside [0, {cfg.vocab_size}): encode it with the model's tokenizer")
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens is {max_new_tokens}: ask for at least 1 new token")
    if temperature < 0:
        raise GenerateError(f"temperature is {temperature}: use 0 for greedy decoding or a positive value")
    if top_k is not None and top_k < 1:
        raise GenerateError(f"top_k is {top_k}: use a positive integer (larger than the vocabulary keeps all), or None")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerateError(f"top_p is {top_p}: use a probability in (0, 1], or None")
    if any(not 0 <= t < cfg.vocab_size for t in stop_tokens):
        raise GenerateError(f"stop_tokens {list(stop_tokens)} include ids outside [0, {cfg.vocab_size})")


def generate_stream(
    params,
    cfg: GPTConfig,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_tokens: Iterable[int] | None = None,
    chunk_tokens: int = 8,
) -> Iterator[list[list[int]]]:
    """Like `generate`, but yields each row's new tokens as they come: first the token the
    prefill picks, then up to `chunk_tokens` per compiled decoding call. A finished row
    yields empty lists."""
    stop_tokens = list(stop_tokens or [])
    _check(cfg, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens)
    top_k = None if top_k is None else min(top_k, cfg.vocab_size)  # as nanoGPT: k past the vocabulary keeps all
    prompts = [list(p)[-cfg.block_size :] for p in prompts]  # crop as nanoGPT does
    B = pow2_bucket(len(prompts))
    P = min(pow2_bucket(max(map(len, prompts)), 16), cfg.block_size)
    prompt_BP = np.zeros((B, P), np.int32)
    plen_B = np.ones((B,), np.int32)  # padding rows: one token, done from the start
    for i, p in enumerate(prompts):
        prompt_BP[i, P - len(p) :] = p
        plen_B[i] = len(p)
    stop_ids = np.full((pow2_bucket(max(len(stop_tokens), 1)),), -1, np.int32)
    stop_ids[: len(stop_tokens)] = stop_tokens
    sampling = {
        "temperature": np.float32(temperature or 1.0),
        "top_k": np.int32(top_k or 1),
        "top_p": np.float32(top_p or 1.0),
        "seed": np.uint32(seed % 2**32),
        "stop_ids": stop_ids,
    }
    sampler = (temperature == 0, top_k is not None, top_p is not None)
    live_B = np.arange(B) < len(prompts)
    if B > 1:  # copies of the kernels, made once per request and read at every step
        params = _transpose_kernels(params)

    n_new = pow2_bucket(max_new_tokens, 16)
    max_slots = _max_slots(P, n_new, cfg)
    state = _prefill(params, prompt_BP, plen_B, live_B, sampling, cfg, n_new, sampler)
    sent = 0
    while True:
        tokens_BS, n_new_B, done_B, step, index = jax.device_get(
            (state["tokens_BS"], state["n_new_B"], state["done_B"], state["step"], state["cache"]["index"])
        )
        if step > sent:
            yield [tokens_BS[i, P + sent : P + max(sent, n_new_B[i])].tolist() for i in range(len(prompts))]
        sent = int(step)
        if sent >= max_new_tokens or done_B.all():
            return
        slots = state["cache"]["pos_BS"].shape[1]
        if index == slots < max_slots:
            state = _grow_cache(state, min(4 * slots, max_slots))
        until = np.int32(min(sent + chunk_tokens, max_new_tokens))
        state = _decode(params, state, until, sampling, cfg, sampler)


def generate(
    params,
    cfg: GPTConfig,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_tokens: Iterable[int] | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (prompts may differ in length).

    Sampling filters apply in order temperature, top-k, top-p; temperature 0 is greedy.
    A row ends after its first stop token (which is included) or `max_new_tokens`.
    Contexts longer than block_size slide: the model sees the last block_size tokens.
    Runs as one prefill call and one compiled decoding loop per cache size.
    """
    out = [[] for _ in prompts]
    chunks = generate_stream(
        params, cfg, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens,
        chunk_tokens=max_new_tokens,
    )
    for chunk in chunks:
        for row, new in zip(out, chunk):
            row.extend(new)
    return out


def stream_text(chunks: Iterable[list[list[int]]], tokenizer) -> Iterator[list[str]]:
    """Text pieces of each row for each chunk of `generate_stream`, never splitting a
    UTF-8 character: bytes of a character that BPE spreads over tokens wait for the rest."""
    decoders = None
    for chunk in chunks:
        if decoders is None:
            decoders = [codecs.getincrementaldecoder("utf-8")("replace") for _ in chunk]
        if hasattr(tokenizer, "decode_bytes"):
            yield [d.decode(tokenizer.decode_bytes(ids)) for d, ids in zip(decoders, chunk)]
        else:
            yield [tokenizer.decode(ids) for ids in chunk]

"""Decoding over a KV cache: the one core under `jaxgpt.generate` and the serving engine.

A cache holds, for every layer, the keys and values of S slots per row, and the position
of each slot (-1 while empty). Attention is the model's own (`model.attention`, the
function training's forward calls), masked by these positions: a token sees the slots
whose positions lie in its window (its position - block_size, its position]. So the order
of the slots does not matter, padding (position -1) is never seen, and under rotary
positions a cache of at least block_size slots can be a ring that slides past block_size
(a token's key never changes). A learned position table allows no position past
block_size - 1: there `decode` stops, and `generate` recomputes cropped windows.

The cycle, for `generate` and the engine alike:
- `init_cache`, then `prefill` writes prompts (all but their last token) at given slots
  (`prefill_and_pick` writes whole prompts and picks their first tokens);
- `insert` puts one prefilled row into a batch cache, `resize` grows or shrinks it;
- `decode` runs a chunk of steps. Each feeds every live row's last token, writes its key and
  value at the slot shared by all rows, (head + step) modulo S, and picks the row's next
  token with the row's own settings (`sample`): greedy, or drawn with the key
  fold_in(fold_in(key(seed), row), n) for its n-th new token, so a seeded row draws the same
  tokens whatever else is decoded beside it.

What each row is and asks for lives in `rows`, host arrays made by `new_rows` and `set_row`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import model
from jaxgpt.config import GPTConfig

TOP_LOGPROBS = 5  # the most alternatives listed with a token's logprob
STATE = ("last", "pos", "n", "live")  # the entries of `rows` (see `new_rows`) that a step changes


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """The shape bucket of `n`: the next power of two, at least `minimum`."""
    return max(minimum, 1 << (n - 1).bit_length())


def init_cache(cfg: GPTConfig, batch: int, slots: int, dtype=jnp.float32) -> dict:
    """An empty cache of `slots` slots per row, its keys and values in `dtype` (the compute
    dtype: the params'). Each layer has its own keys and values [N, S, K], N = batch · key/value
    heads, the layout `model.attention` takes."""
    _, G, K = model.head_dims(cfg)
    shape = (batch * G, slots, K)
    return {
        "k_NSK": [jnp.zeros(shape, dtype) for _ in range(cfg.n_layer)],
        "v_NSK": [jnp.zeros(shape, dtype) for _ in range(cfg.n_layer)],
        "pos_BS": jnp.full((batch, slots), -1, jnp.int32),
    }


def _map_rows(fn, *caches):
    """`fn(per_row, *leaves)` over the leaves of `caches`. Every leaf holds the rows on axis 0,
    `per_row` entries each (1, or a row's key/value heads), and the slots on axis 1."""
    rows = caches[0]["pos_BS"].shape[0]
    return jax.tree.map(lambda *leaves: fn(leaves[0].shape[0] // rows, *leaves), *caches)


def _empty(a) -> int:
    """What an empty slot holds: position -1, keys and values 0."""
    return -1 if a.dtype == jnp.int32 else 0


def float_dtype(tree):
    """The dtype of the first floating leaf: a cache's, or params' compute dtype."""
    return next(a.dtype for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating))


def hidden(params, tokens_BT, positions_BT, cache: dict, at, cfg: GPTConfig):
    """`model.hidden` for tokens written at cache slots [at, at + T) (within the cache):
    returns (final hidden states [N, D], cache). Each token attends to the cached slots in
    its window, its own included. No dropout: this is inference."""
    B, T = tokens_BT.shape
    pos_BS = jax.lax.dynamic_update_slice(cache["pos_BS"], positions_BT, (0, at))
    kpos_B11S, qpos_B1T1 = pos_BS[:, None, None, :], positions_BT[:, None, :, None]
    mask_B1TS = (kpos_B11S >= 0) & (kpos_B11S <= qpos_B1T1) & (kpos_B11S > qpos_B1T1 - cfg.block_size)
    x_BTD = params["wte"][tokens_BT]
    if cfg.pos == "learned":
        x_BTD = x_BTD + params["wpe"][jnp.clip(positions_BT, 0, cfg.block_size - 1)]
    x_ND = x_BTD.reshape(B * T, -1)
    k_cache, v_cache = [], []
    for layer, (p, k_NSK, v_NSK) in enumerate(zip(params["h"], cache["k_NSK"], cache["v_NSK"])):
        q_BTHK, k_BTGK, v_BTGK = model.qkv(p, x_ND, positions_BT, cfg)
        k_NTK, v_NTK = (a.transpose(0, 2, 1, 3).reshape(k_NSK.shape[0], T, -1) for a in (k_BTGK, v_BTGK))
        k_NSK = jax.lax.dynamic_update_slice(k_NSK, k_NTK, (0, at, 0))
        v_NSK = jax.lax.dynamic_update_slice(v_NSK, v_NTK, (0, at, 0))
        y_BTHK = model.attention(q_BTHK, k_NSK, v_NSK, model.score_divisor(cfg, layer), mask_B1TS=mask_B1TS)
        x_ND = model.block_output(p, x_ND, y_BTHK, cfg)
        k_cache.append(k_NSK)
        v_cache.append(v_NSK)
    return model.norm(params["ln_f"], x_ND, cfg), {"k_NSK": k_cache, "v_NSK": v_cache, "pos_BS": pos_BS}


def forward(params, tokens_BT, positions_BT, cache: dict, at, cfg: GPTConfig):
    """Float32 logits [B, T, V] and the cache; see `hidden`."""
    B, T = tokens_BT.shape
    h_ND, cache = hidden(params, tokens_BT, positions_BT, cache, at, cfg)
    return model.logits(params, h_ND, cfg).reshape(B, T, -1), cache


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def prefill(params, cache, tokens_BT, positions_BT, at, cfg: GPTConfig):
    """The cache with these prompt tokens written at slots [at, at + T): the prompts but
    their last token, which the first decode step feeds (so no output layer here)."""
    return hidden(params, tokens_BT, positions_BT, cache, at, cfg)[1]


@functools.partial(jax.jit, static_argnames=("cfg", "greedy"), donate_argnames=("cache",))
def prefill_and_pick(params, cache, tokens_BT, positions_BT, at, rows: dict, cfg: GPTConfig, greedy: bool):
    """`prefill` of whole prompts (left-padded, so each ends at the last slot written) that
    also picks each row's first new token from its last position, as `decode` would: one
    read of the weights before the first token instead of two. Returns (cache, the rows'
    state after it, as `decode` returns it: "last" holds the tokens picked)."""
    h_ND, cache = hidden(params, tokens_BT, positions_BT, cache, at, cfg)
    state = {k: rows[k] for k in STATE}
    return cache, _advance(last_logits(params, h_ND, tokens_BT.shape[0], cfg), state, rows, greedy)


@functools.partial(jax.jit, donate_argnames=("cache",))
def insert(cache, row_cache, row, head):
    """The batch cache with row `row` replaced by `row_cache` (one prefilled row of at most
    as many slots), rolled so that its last slot lies just before slot `head`."""

    def place(per_row, big, small):
        empty = jnp.full_like(big[:per_row], _empty(big))
        row_cache = jax.lax.dynamic_update_slice_in_dim(empty, small, 0, 1)
        row_cache = jnp.roll(row_cache, head - small.shape[1], axis=1)
        return jax.lax.dynamic_update_slice_in_dim(big, row_cache, row * per_row, 0)

    return _map_rows(place, cache, row_cache)


@jax.jit
def take_row(cache, row):
    """Row `row` of a cache, as a one-row cache."""
    return _map_rows(lambda per_row, a: jax.lax.dynamic_slice_in_dim(a, row * per_row, per_row, 0), cache)


@functools.partial(jax.jit, static_argnames=("slots",))
def resize(cache, head, slots: int):
    """The cache rolled so that slot `head` (the oldest) comes first, then padded with empty
    slots (the next write goes to the old size) or cut to its newest `slots` slots (to 0)."""

    def resize_leaf(old):
        rolled = jnp.roll(old, -head, axis=1)
        S = old.shape[1]
        if slots <= S:
            return rolled[:, S - slots:]
        pad = [(0, 0)] * old.ndim
        pad[1] = (0, slots - S)
        return jnp.pad(rolled, pad, constant_values=_empty(old))

    return jax.tree.map(resize_leaf, cache)


@jax.jit
def transpose_kernels(params):
    """The params with every block's kernel stored [out, in] (as `kernel_T`), for decoding
    1-16 rows at a time: XLA:CPU multiplies them by a large weight faster with the weight as
    the left operand (GPT-2 124M's mat-vecs 1.2x at 1 row, ~1.3x at 8 rows; see
    `model.matmul_T`)."""

    def dense_T(p):
        if "kernel" not in p:  # a norm
            return p
        return {"kernel_T": p["kernel"].T} | {k: v for k, v in p.items() if k != "kernel"}

    blocks = [
        b | {part: {name: dense_T(p) for name, p in b[part].items()} for part in ("attn", "mlp")}
        for b in params["h"]
    ]
    return params | {"h": blocks}


def last_logits(params, h_ND, B: int, cfg: GPTConfig) -> jax.Array:
    """Float32 logits [B, V] of each row's last position, from the output layer [V, D] as
    stored (`model.matmul_T`)."""
    h_BD = h_ND.reshape(B, -1, h_ND.shape[-1])[:, -1]
    return model.softcap(model.matmul_T(h_BD, model.output_embedding(params)), cfg)


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


def new_rows(batch: int, vocab_size: int, stops: int = 1) -> dict:
    """Host arrays describing `batch` empty rows; `stops` stop tokens per row at most."""
    return {
        "last": np.zeros(batch, np.int32),  # the token the next step feeds
        "pos": np.zeros(batch, np.int32),  # its position
        "n": np.zeros(batch, np.int32),  # new tokens picked so far
        "live": np.zeros(batch, bool),
        "max_tokens": np.ones(batch, np.int32),
        "temperature": np.zeros(batch, np.float32),
        "top_k": np.full(batch, vocab_size, np.int32),  # the vocabulary keeps every token, exactly
        "top_p": np.ones(batch, np.float32),
        "use_top_p": np.zeros(batch, bool),
        "filter": np.zeros(batch, bool),  # top-k or top-p apply
        "seed": np.zeros(batch, np.uint32),
        "row": np.zeros(batch, np.int32),  # the row of the key, see the module's docstring
        "logprobs": np.zeros(batch, bool),
        "stop": np.full((batch, stops), -1, np.int32),
    }


def set_row(rows: dict, b: int, prompt: list[int], max_tokens: int, vocab_size: int, *, temperature: float = 1.0,
            top_k: int | None = None, top_p: float | None = None, seed: int = 0, row: int = 0,
            logprobs: bool = False, stop: list[int] = ()) -> None:
    """Makes row `b` of `rows` live: it feeds the prompt's last token next (the prefill wrote
    the others) and picks at most `max_tokens` tokens, ending after one of `stop`."""
    rows["last"][b], rows["pos"][b], rows["n"][b], rows["live"][b] = prompt[-1], len(prompt) - 1, 0, True
    rows["max_tokens"][b] = max_tokens
    rows["temperature"][b] = temperature
    rows["top_k"][b] = min(top_k or vocab_size, vocab_size)  # as nanoGPT: k past the vocabulary keeps all
    rows["top_p"][b] = top_p or 1.0
    rows["use_top_p"][b] = top_p is not None
    rows["filter"][b] = temperature > 0 and (top_k is not None or top_p is not None)
    rows["seed"][b] = seed % 2**32
    rows["row"][b] = row
    rows["logprobs"][b] = logprobs
    rows["stop"][b] = -1
    rows["stop"][b, : len(stop)] = stop


def sample(logits_BV, n_B, rows: dict):
    """Each row's next token under its own settings; filters and random draws run only when
    some row asks for them."""
    greedy_B = rows["temperature"] == 0
    temperature_B = jnp.where(greedy_B, 1.0, rows["temperature"])

    def top_k_only(l_V, t, k):
        return filter_logits(l_V[None], t, k)[0]

    def top_k_and_p(l_V, t, k, p):
        return filter_logits(l_V[None], t, k, p)[0]

    def filtered(l_BV):
        k_BV = jax.vmap(top_k_only)(l_BV, temperature_B, rows["top_k"])
        kp_BV = jax.vmap(top_k_and_p)(l_BV, temperature_B, rows["top_k"], rows["top_p"])
        return jnp.where(rows["use_top_p"][:, None], kp_BV, k_BV)

    def drawn(l_BV):
        l_BV = jax.lax.cond(jnp.any(rows["filter"]), filtered, lambda l: l / temperature_B[:, None], l_BV)
        fold = lambda seed, row, n: jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), row), n)  # noqa: E731
        keys_B = jax.vmap(fold)(rows["seed"], rows["row"], n_B)
        return jax.vmap(jax.random.categorical)(keys_B, l_BV).astype(jnp.int32)

    sampled_B = jax.lax.cond(jnp.all(greedy_B), lambda l: jnp.zeros(l.shape[:1], jnp.int32), drawn, logits_BV)
    return jnp.where(greedy_B, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), sampled_B)


def _advance(logits_BV, state: dict, rows: dict, greedy: bool):
    """The rows' state after picking each row's next token (argmax under `greedy`, else
    `sample`): the token is "last", fed next at the next position, and the row stays live
    unless it was one of its stop tokens or its max_tokens-th."""
    n_B = state["n"]
    tok_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32) if greedy else sample(logits_BV, n_B, rows)
    live_B = state["live"] & ~(tok_B[:, None] == rows["stop"]).any(-1) & (n_B + 1 < rows["max_tokens"])
    return {"last": tok_B, "pos": state["pos"] + 1, "n": n_B + 1, "live": live_B}


def _logprobs(logits_BV, tok_B, want_B):
    """The log-probability of each picked token and its TOP_LOGPROBS most likely
    alternatives (zeros unless some row wants them; `want_B` None: none can)."""
    B = logits_BV.shape[0]

    def compute(l_BV):
        lp_BV = jax.nn.log_softmax(l_BV, axis=-1)
        top_lp_BN, top_ids_BN = jax.lax.top_k(lp_BV, TOP_LOGPROBS)
        return jnp.take_along_axis(lp_BV, tok_B[:, None], axis=-1)[:, 0], top_ids_BN.astype(jnp.int32), top_lp_BN

    def skip(l_BV):
        return (jnp.zeros((B,), jnp.float32), jnp.zeros((B, TOP_LOGPROBS), jnp.int32),
                jnp.zeros((B, TOP_LOGPROBS), jnp.float32))

    return skip(logits_BV) if want_B is None else jax.lax.cond(jnp.any(want_B), compute, skip, logits_BV)


@functools.partial(jax.jit, static_argnames=("cfg", "steps", "used", "greedy", "logprobs"), donate_argnames=("cache",))
def decode(params, cache, head, rows: dict, until, cfg: GPTConfig, steps: int, used: int, greedy: bool = False,
           logprobs: bool = True):
    """Decode steps of the first `used` rows (the others are empty), writing slot (head + k)
    modulo the cache's size at step k: `until` steps (at most `steps`), fewer once no row is
    live or, with a learned position table, once a live row's next position passes
    block_size - 1. A row stops being live after a stop token or its max_tokens-th token.
    `greedy` (every row's temperature is 0) and `logprobs` False leave the sampling filters
    and the logprobs out of the compiled program (their outputs are zeros).

    Returns (cache, steps run, picked, state): picked {"tokens", "live", "logprob",
    "top_ids", "top_logprobs"}, each [used, steps, ...] (a step's token counts where `live`:
    the row was live when it was picked), and the rows' "last", "pos", "n" and "live" after
    the last step run, [used] each."""
    full = cache
    cache = _map_rows(lambda per_row, a: a[: used * per_row], cache)
    rows = {k: v[:used] for k, v in rows.items()}
    S = cache["pos_BS"].shape[1]
    zeros = lambda dtype, *shape: jnp.zeros((used, steps, *shape), dtype)  # noqa: E731
    out = {"tokens": zeros(jnp.int32), "live": zeros(bool), "logprob": zeros(jnp.float32),
           "top_ids": zeros(jnp.int32, TOP_LOGPROBS), "top_logprobs": zeros(jnp.float32, TOP_LOGPROBS)}

    def running(c):
        k, _, state, _ = c
        live_B = state["live"]
        fits = jnp.all(~live_B | (state["pos"] < cfg.block_size)) if cfg.pos == "learned" else True
        return (k < jnp.minimum(until, steps)) & jnp.any(live_B) & fits

    def step(c):
        k, cache, state, out = c
        live_B = state["live"]
        h_ND, cache = hidden(params, state["last"][:, None], jnp.where(live_B, state["pos"], -1)[:, None], cache,
                             (head + k) % S, cfg)
        logits_BV = last_logits(params, h_ND, used, cfg)
        next_state = _advance(logits_BV, state, rows, greedy)
        tok_B = next_state["last"]
        want_B = rows["logprobs"] & live_B if logprobs else None
        logprob_B, top_ids_BN, top_logprobs_BN = _logprobs(logits_BV, tok_B, want_B)
        picked = {"tokens": tok_B, "live": live_B, "logprob": logprob_B, "top_ids": top_ids_BN,
                  "top_logprobs": top_logprobs_BN}
        out = {name: a.at[:, k].set(picked[name]) for name, a in out.items()}
        return k + 1, cache, next_state, out

    k, cache, state, out = jax.lax.while_loop(running, step, (jnp.int32(0), cache, {k: rows[k] for k in STATE}, out))
    cache = jax.tree.map(lambda big, a: jax.lax.dynamic_update_slice_in_dim(big, a, 0, 0), full, cache)
    return cache, k, out, state

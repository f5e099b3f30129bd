"""Generation: prefill the prompts in one call, then decode in compiled chunks over a KV
cache, with `jaxgpt.decode`, the core the serving engine shares.

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
from collections.abc import Iterable, Iterator

import jax
import numpy as np

from jaxgpt import decode
from jaxgpt.config import GPTConfig
from jaxgpt.decode import pow2_bucket
from jaxgpt.errors import UserError


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
    """Like `generate`, but yields each row's new tokens as they come: first the first token
    alone, then up to `chunk_tokens` per compiled decoding call. A finished row yields
    empty lists."""
    stop_tokens = list(stop_tokens or [])
    _check(cfg, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens)
    bs = cfg.block_size
    seqs = [list(p)[-bs:] for p in prompts]  # crop as nanoGPT does; then each row's tokens so far
    B = pow2_bucket(len(seqs))
    P = min(pow2_bucket(max(map(len, seqs)), 16), bs)
    rows = decode.new_rows(B, cfg.vocab_size, pow2_bucket(max(len(stop_tokens), 1)))
    for i, seq in enumerate(seqs):
        decode.set_row(rows, i, seq, max_new_tokens, cfg.vocab_size, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, row=i, stop=stop_tokens)
    dtype = decode.float_dtype(params)
    decode_params = decode.transpose_kernels(params)  # read at every step: worth a copy
    steps, greedy = pow2_bucket(chunk_tokens), temperature == 0
    max_slots = P + min(pow2_bucket(max_new_tokens, 16), bs)  # under rope, >= block_size once a row can pass it
    slots = min(2 * P, max_slots)
    cache, state = decode.prefill_and_pick(params, decode.init_cache(cfg, B, slots, dtype),
                                           *_left_padded(seqs, B, P, whole=True), np.int32(0), rows, cfg, greedy)
    rows |= {k: np.array(v) for k, v in state.items()}
    chunk = [[int(rows["last"][i])] for i in range(len(seqs))]
    for seq, new in zip(seqs, chunk):
        seq.extend(new)
    yield chunk
    head = P  # the slot the next step writes, counted without wrapping
    windows = False  # a learned position table and a row past block_size: see _window_step
    want = chunk_tokens
    while rows["live"].any():
        chunk, got = [[] for _ in seqs], 0
        while got < want and rows["live"].any():
            windows = windows or (cfg.pos == "learned" and (rows["pos"][rows["live"]] >= bs).any())
            if windows:
                n, picked, state = _window_step(params, decode_params, seqs, rows, cfg, steps, greedy)
            else:
                if head == slots and not (cfg.pos == "rope" and slots >= bs):
                    slots = min(4 * slots, max_slots)
                    cache = decode.resize(cache, np.int32(0), slots)
                ring = cfg.pos == "rope" and slots >= bs  # the cache slides: a slot is free once out of every window
                until = np.int32(want - got if ring else min(want - got, slots - head))
                cache, n, picked, state = decode.decode(decode_params, cache, np.int32(head % slots), rows, until, cfg,
                                                        steps, B, greedy, logprobs=False)
                n, picked, state = jax.device_get((n, picked, state))
                head += int(n)
            for new_so_far, new in zip(chunk, _take(seqs, rows, n, picked, state)):
                new_so_far.extend(new)
            got += int(n)
        yield chunk


def _take(seqs: list[list[int]], rows: dict, n, picked: dict, state: dict) -> list[list[int]]:
    """Appends the tokens `decode.decode` picked to each sequence and updates `rows`;
    returns each sequence's new tokens."""
    chunk = [picked["tokens"][i, : picked["live"][i, :n].sum()].tolist() for i in range(len(seqs))]
    for seq, new in zip(seqs, chunk):
        seq.extend(new)
    rows |= {k: np.array(v) for k, v in state.items()}
    return chunk


def _left_padded(seqs: list[list[int]], B: int, L: int, whole: bool = False):
    """Each sequence but its last token (or `whole`), left-padded to L tokens, with its
    positions (-1 where padding), for `decode.prefill`; rows past the sequences are padding."""
    tokens_BL, pos_BL = np.zeros((B, L), np.int32), np.full((B, L), -1, np.int32)
    for i, seq in enumerate(seqs):
        seq = seq if whole else seq[:-1]
        if seq:
            tokens_BL[i, L - len(seq):], pos_BL[i, L - len(seq):] = seq, np.arange(len(seq))
    return tokens_BL, pos_BL


def _window_step(params, decode_params, seqs, rows: dict, cfg: GPTConfig, steps: int, greedy: bool):
    """One step over each row's last block_size tokens, recomputed from scratch at positions
    from 0 (a learned position table, past block_size): returns `decode.decode`'s step
    count, picks and state."""
    bs, B = cfg.block_size, rows["last"].shape[0]
    windows = [seq[-bs:] for seq in seqs]
    rows["pos"][: len(windows)] = [len(w) - 1 for w in windows]
    cache = decode.init_cache(cfg, B, bs, decode.float_dtype(params))
    cache = decode.prefill(params, cache, *_left_padded(windows, B, bs - 1), np.int32(0), cfg)
    _, n, picked, state = decode.decode(decode_params, cache, np.int32(bs - 1), rows, np.int32(1), cfg, steps, B,
                                        greedy, logprobs=False)
    return jax.device_get((n, picked, state))


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
    Runs as one prefill call and one compiled decoding call per cache size.
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

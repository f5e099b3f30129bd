"""The serving engine: continuous batching over a fixed number of decode slots.

One thread owns JAX. It takes sequences from a bounded queue and prefills their prompts:
short ones several at once, as the rows of one call (prompts of one length bucket
together), a long one alone in chunks, with decode chunks between them so that running
requests keep streaming. It inserts each prompt's KV cache into a free row of the batch
cache and decodes all rows together, a few tokens per compiled call. Between calls it frees
the rows of finished or cancelled sequences and admits new ones.

The batch cache is a ring: every decode step writes all rows at one shared slot, `head`
modulo the ring size. Attention masks slots by the positions stored with them, not by their
order, so a prompt's cache goes into its row just behind the head (rolled into place) and
the row's later tokens follow it; a row that needs at most ring-size slots is never
overwritten while it lives. The ring grows (and shrinks back) in powers of two from 256, so
attention reads about as many slots as the longest live request needs, not the whole
context (GPT-2 124M, 16 rows: ~48 ms a step at 256 slots, ~62 at 512, ~85 at 1024 on a
quiet 2-core AMD EPYC).

The prefill writes all of a prompt but its last token; the first decode step feeds that
token and picks the first new one, so the prefill needs no output layer.

Sampling follows `jaxgpt.generate` row for row: the key of new token n of a sequence is
fold_in(fold_in(key(seed), row), n), so a seeded sequence draws the same tokens alone,
mixed with others, or as row `row` of `generate(..., seed=seed)`.
"""

import collections
import dataclasses
import threading
import time
import traceback
from collections.abc import Callable

import jax
import numpy as np

from jaxgpt import decode
from jaxgpt.config import GPTConfig
from jaxgpt.decode import pow2_bucket

PREFILL_CHUNK = 256  # prompt tokens per prefill call while other rows decode; longer prompts go in chunks
PREFILL_ROWS = (1, 4, 16)  # short prompts of one length bucket prefilled together, in calls of these many rows
PREFILL_TOKENS = 1024  # the most padded prompt tokens (rows x bucket) in one prefill call
SMALLEST_RING = 256  # ring sizes: this times powers of two, up to the context


class QueueFull(Exception):
    """The queue holds as many sequences as it may."""


class Draining(Exception):
    """The engine is shutting down and takes no new sequences."""


@dataclasses.dataclass(eq=False)
class Sequence:
    """One completion to generate. The engine thread calls `emit(kind, payload)`:
    ("tokens", (ids, logprobs, top_ids, top_logprobs)) as tokens come (the last three
    None unless `logprobs`), then once ("done", "stop" | "length" | "cancelled") or
    ("error", message). `stop_token` ends the sequence and is not emitted."""

    prompt: list[int]
    max_tokens: int
    emit: Callable[[str, object], None]
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    row: int = 0
    logprobs: bool = False
    stop_token: int | None = None
    cancelled: bool = False
    generated: int = 0

    @property
    def need(self) -> int:
        """Ring slots the sequence fills: its prompt and every new token but the last."""
        return len(self.prompt) - 1 + self.max_tokens


def short_buckets(block_size: int) -> list[int]:
    """Padded lengths of the prompts prefilled in one chunk: powers of two from 16 and 1.5
    times them, up to PREFILL_CHUNK (finer than powers of two alone: less padding computed)."""
    top = min(PREFILL_CHUNK, max(16, pow2_bucket(block_size)))
    return sorted(L for k in range(4, 32) for L in (1 << k, 3 << (k - 1)) if L <= top)


def _bucket(n: int, buckets: list[int]) -> int:
    return next(L for L in buckets if L >= n)


def _prefill_calls(lengths: list[int], buckets: list[int]) -> list[tuple[int, list[int]]]:
    """How to prefill prompts of these lengths (the tokens before the last, each within
    the largest of `buckets`): [(bucket L, indices of the prompts in one call)], each call
    of a row count in PREFILL_ROWS with rows x L at most PREFILL_TOKENS (or one row)."""
    by_bucket = collections.defaultdict(list)
    for i, n in enumerate(lengths):
        by_bucket[_bucket(max(n, 1), buckets)].append(i)
    calls = []
    for L, todo in sorted(by_bucket.items(), reverse=True):
        while todo:
            P = max(p for p in PREFILL_ROWS if p <= len(todo) and (p == 1 or p * L <= PREFILL_TOKENS))
            calls.append((L, todo[:P]))
            todo = todo[P:]
    return calls


class Engine:
    """Continuous batching on one thread. `submit` and `cancel` are safe from any thread."""

    def __init__(self, params, cfg: GPTConfig, slots: int = 16, max_queue: int = 64, decode_chunk: int = 4,
                 log: Callable[[str], None] = print):
        self.cfg, self.slots, self.max_queue, self.decode_chunk, self.log = cfg, slots, max_queue, decode_chunk, log
        self.params = params
        # Few live rows decode in a smaller batch: a step's cost grows with the rows computed.
        self.row_buckets = sorted({min(4**k, slots) for k in range(16)})
        self.short_buckets = short_buckets(cfg.block_size)
        self.ring_sizes = sorted({min(SMALLEST_RING << k, max(16, pow2_bucket(cfg.block_size))) for k in range(16)})
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()  # set when compiled, or when that failed (see `failure`)
        self.failure: Exception | None = None
        self.rows: list[Sequence | None] = [None] * slots
        self.tokens_per_s = 0.0

    # --- the HTTP side -------------------------------------------------------------

    def submit(self, seqs: list[Sequence]) -> None:
        """Queues `seqs` (all or none); QueueFull or Draining when it cannot."""
        with self._lock:
            if self._stopping:
                raise Draining
            self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)
            if len(self._waiting) + len(seqs) > self.max_queue:
                raise QueueFull
            self._waiting.extend(seqs)
        self._wake.set()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Frees the slots of `seqs` before the next decode chunk."""
        for s in seqs:
            s.cancelled = True
        self._wake.set()

    @property
    def queue_depth(self) -> int:
        return sum(not s.cancelled for s in list(self._waiting))

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.rows)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="jaxgpt-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the engine thread; sequences still queued or running end as cancelled."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()

    # --- the engine thread ---------------------------------------------------------

    def _run(self) -> None:
        try:
            self._setup()
        except Exception as e:  # a compile error, out of memory: `jaxgpt serve` reports it and exits
            self.failure = e
            return
        finally:
            self.ready.set()
        while True:
            with self._lock:
                if self._stopping:
                    break
            try:
                self._iteration()
            except Exception as e:  # a failed JAX call: fail what is in flight, keep serving
                traceback.print_exc()
                self._fail_all(f"the engine failed: {type(e).__name__}: {e}")
        for seq in [*self._waiting, *[s for s in self.rows if s is not None]]:
            seq.emit("done", "cancelled")

    def _setup(self) -> None:
        cfg, B = self.cfg, self.slots
        # Decoding is faster with the kernels stored [out, in] (see decode.transpose_kernels).
        self.decode_params = decode.transpose_kernels(self.params)
        self.dtype = decode.float_dtype(self.params)
        self.ring = self.ring_sizes[0]
        self.cache = decode.init_cache(cfg, B, self.ring, self.dtype)
        self.head = 0
        self._prefilling = None  # (seq, prompt cache, the chunks left to prefill)
        self.host = decode.new_rows(B, cfg.vocab_size)
        self._compile()

    def _compile(self) -> None:
        """Compiles every prefill bucket, decode ring size and row count, insertion and resize
        now, not under the first requests."""
        t0 = time.perf_counter()
        buckets = [16 << i for i in range(32) if 16 << i <= max(16, pow2_bucket(self.cfg.block_size))]
        lengths = sorted(set(buckets) | set(self.short_buckets))
        prefill_shapes = [(P, L) for L in lengths for P in PREFILL_ROWS  # a call fills free rows: P <= slots
                          if P == 1 or (P <= self.slots and L <= PREFILL_CHUNK and P * L <= PREFILL_TOKENS)]
        for P, L in prefill_shapes:
            C = min(L, PREFILL_CHUNK)
            prompt_cache = decode.init_cache(self.cfg, P, L, self.dtype)
            prompt_cache = decode.prefill(self.params, prompt_cache, np.zeros((P, C), np.int32),
                                          np.full((P, C), -1, np.int32), np.int32(0), self.cfg)
            if P > 1:
                decode.take_row(prompt_cache, np.int32(0))
        for ring in self.ring_sizes:
            cache = decode.init_cache(self.cfg, self.slots, ring, self.dtype)
            for used in self.row_buckets:
                cache, *_ = decode.decode(self.decode_params, cache, np.int32(0), self.host, np.int32(self.decode_chunk),
                                          self.cfg, self.decode_chunk, used)
            for L in (L for L in lengths if L <= ring):
                cache = decode.insert(cache, decode.init_cache(self.cfg, 1, L, self.dtype), np.int32(0), np.int32(0))
            for other in self.ring_sizes:
                if other != ring:
                    decode.resize(cache, np.int32(0), other)
        self.log(f"compiled {len(prefill_shapes)} prefill shapes and decoding for {len(self.ring_sizes)} ring sizes x "
                 f"{len(self.row_buckets)} row counts ({self.slots} slots) in {time.perf_counter() - t0:.1f} s")

    def _iteration(self) -> None:
        for b, seq in enumerate(self.rows):
            if seq is not None and seq.cancelled:
                self._free(b, "cancelled")
        self._admit()
        if self.host["live"].any():
            self._decode_chunk()
        elif self._prefilling is None:
            self._wake.wait(0.05)
            self._wake.clear()

    def _next_waiting(self) -> Sequence | None:
        with self._lock:
            while self._waiting:
                seq = self._waiting.popleft()
                if not seq.cancelled:
                    return seq
                seq.emit("done", "cancelled")
        return None

    def _short_prompts(self, free: int, budget: int | None) -> list[Sequence]:
        """The waiting sequences at the head of the queue whose prompts fit one prefill chunk:
        at most `free`, and (after the first) at most `budget` padded prompt tokens in all."""
        seqs, tokens = [], 0
        with self._lock:
            while self._waiting and len(seqs) < free:
                seq = self._waiting[0]
                if seq.cancelled:
                    self._waiting.popleft()
                    seq.emit("done", "cancelled")
                    continue
                if len(seq.prompt) - 1 > self.short_buckets[-1]:
                    break
                n = _bucket(max(len(seq.prompt) - 1, 1), self.short_buckets)
                if seqs and budget is not None and tokens + n > budget:
                    break
                seqs.append(self._waiting.popleft())
                tokens += n
        return seqs

    def _prefill_short(self, seqs: list[Sequence]) -> int:
        """Prefills these prompts (each within one chunk) in calls of several rows and inserts
        each into a free row; returns the padded prompt tokens computed."""
        heads = [s.prompt[:-1] for s in seqs]
        computed, pending = 0, set(range(len(seqs)))
        try:
            for L, idx in _prefill_calls([len(h) for h in heads], self.short_buckets):
                tokens_PL, pos_PL = np.zeros((len(idx), L), np.int32), np.full((len(idx), L), -1, np.int32)
                for r, i in enumerate(idx):  # left-padded: the prompt ends at the bucket's last slot
                    n = len(heads[i])
                    if n:
                        tokens_PL[r, L - n:], pos_PL[r, L - n:] = heads[i], np.arange(n)
                cache = decode.init_cache(self.cfg, len(idx), L, self.dtype)
                cache = decode.prefill(self.params, cache, tokens_PL, pos_PL, np.int32(0), self.cfg)
                computed += tokens_PL.size
                for r, i in enumerate(idx):
                    if seqs[i].cancelled:
                        seqs[i].emit("done", "cancelled")
                    else:
                        self._insert(seqs[i], cache if len(idx) == 1 else decode.take_row(cache, np.int32(r)))
                    pending.discard(i)  # only now: a sequence whose insert raised is in no row yet
        except Exception as e:  # the rows' sequences are failed by the caller; these are in no row yet
            for i in pending:
                seqs[i].emit("error", f"the engine failed: {type(e).__name__}: {e}")
            raise
        return computed

    def _admit(self) -> None:
        """Prefills waiting prompts into free rows: without limit while no row decodes,
        else about PREFILL_CHUNK prompt tokens before the next decode chunk."""
        budget = PREFILL_CHUNK if self.host["live"].any() else None
        while None in self.rows and (budget is None or budget > 0):
            if self._prefilling is None:
                short = self._short_prompts(self.rows.count(None), budget)
                if short:
                    computed = self._prefill_short(short)
                    budget = None if budget is None else budget - computed
                    continue
                seq = self._next_waiting()
                if seq is None:
                    return
                try:
                    self._start_prefill(seq)
                except Exception as e:  # in no row and not prefilling: _fail_all would not see it
                    seq.emit("error", f"the engine failed: {type(e).__name__}: {e}")
                    raise
            seq, prompt_cache, starts = self._prefilling
            if seq.cancelled:
                self._prefilling = None
                seq.emit("done", "cancelled")
                continue
            start, tokens_1C, pos_1C = starts.pop(0)
            prompt_cache = decode.prefill(self.params, prompt_cache, tokens_1C, pos_1C, np.int32(start), self.cfg)
            self._prefilling = (seq, prompt_cache, starts)
            if budget is not None:
                budget -= tokens_1C.shape[1]
            if not starts:
                self._insert(seq, prompt_cache)
                self._prefilling = None  # only now: _fail_all fails it if the insert raises

    def _start_prefill(self, seq: Sequence) -> None:
        """A long prompt but its last token, left-padded to a bucket of L slots, in chunks."""
        head = seq.prompt[:-1]
        L = pow2_bucket(max(len(head), 1), 16)
        C = min(L, PREFILL_CHUNK)
        tokens_L = np.zeros(L, np.int32)
        pos_L = np.full(L, -1, np.int32)
        if head:
            tokens_L[L - len(head):] = head
            pos_L[L - len(head):] = np.arange(len(head))
        chunks = [(s, tokens_L[None, s:s + C], pos_L[None, s:s + C]) for s in range(0, L, C)]
        chunks = [c for c in chunks if (c[2] >= 0).any()] or chunks[-1:]  # all-padding chunks change nothing
        self._prefilling = (seq, decode.init_cache(self.cfg, 1, L, self.dtype), chunks)

    def _set_ring(self, ring: int) -> None:
        if ring == self.ring:
            return
        if all(s is None for s in self.rows):  # nothing to keep: a fresh ring, no copy
            self.cache, self.head = decode.init_cache(self.cfg, self.slots, ring, self.dtype), 0
        else:
            self.cache = decode.resize(self.cache, np.int32(self.head % self.ring), ring)
            self.head = self.ring if ring > self.ring else 0
        self.ring = ring

    def _fitting_ring(self, need: int) -> int:
        return next((r for r in self.ring_sizes if r >= need), self.ring_sizes[-1])

    def _insert(self, seq: Sequence, prompt_cache) -> None:
        need = max([seq.need] + [s.need for s in self.rows if s is not None])
        if self._fitting_ring(need) > self.ring:
            self._set_ring(self._fitting_ring(need))
        b = self.rows.index(None)
        self.cache = decode.insert(self.cache, prompt_cache, np.int32(b), np.int32(self.head % self.ring))
        decode.set_row(self.host, b, seq.prompt, seq.max_tokens, self.cfg.vocab_size, temperature=seq.temperature,
                       top_k=seq.top_k, top_p=seq.top_p, seed=seq.seed, row=seq.row, logprobs=seq.logprobs,
                       stop=[] if seq.stop_token is None else [seq.stop_token])
        self.rows[b] = seq

    def _free(self, b: int, reason: str) -> None:
        seq, self.rows[b] = self.rows[b], None
        self.host["live"][b] = False
        seq.emit("done", reason)
        live = [s.need for s in self.rows if s is not None]
        if self._fitting_ring(max(live, default=1)) < self.ring and self._prefilling is None:
            self._set_ring(self._fitting_ring(max(live, default=1)))

    def _decode_chunk(self) -> None:
        t0 = time.perf_counter()
        K = self.decode_chunk
        last_row = max(b for b, seq in enumerate(self.rows) if seq is not None)
        used = next(u for u in self.row_buckets if u > last_row)
        self.cache, n, picked, state = decode.decode(self.decode_params, self.cache, np.int32(self.head % self.ring),
                                                     self.host, np.int32(K), self.cfg, K, used)
        n, picked, state = jax.device_get((n, picked, state))
        tok_BK, live_BK, lp_BK, top_ids_BKN, top_lp_BKN = (picked[k] for k in ("tokens", "live", "logprob", "top_ids",
                                                                               "top_logprobs"))
        self.head += int(n)
        h, emitted = self.host, 0
        for b, seq in enumerate(self.rows[:used]):
            if seq is None:
                continue
            n = int(live_BK[b].sum())  # live steps come first
            ids = tok_BK[b, :n].tolist()
            stopped = n > 0 and ids[-1] == seq.stop_token
            keep = n - stopped
            if keep:
                lp = (lp_BK[b, :keep].tolist(), top_ids_BKN[b, :keep].tolist(), top_lp_BKN[b, :keep].tolist()) \
                    if seq.logprobs else (None, None, None)
                seq.generated += keep
                emitted += keep
                seq.emit("tokens", (ids[:keep], *lp))
            if stopped:
                self._free(b, "stop")
            elif seq.generated >= seq.max_tokens:
                self._free(b, "length")
            else:
                for k in ("last", "pos", "n"):
                    h[k][b] = state[k][b]
        self.tokens_per_s = emitted / (time.perf_counter() - t0)

    def _fail_all(self, message: str) -> None:
        for b, seq in enumerate(self.rows):
            if seq is not None:
                self.rows[b] = None
                self.host["live"][b] = False
                seq.emit("error", message)
        if self._prefilling is not None:
            self._prefilling[0].emit("error", message)
            self._prefilling = None
        self.ring = self.ring_sizes[0]
        self.cache = decode.init_cache(self.cfg, self.slots, self.ring, self.dtype)
        self.head = 0

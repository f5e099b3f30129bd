"""Serving: `jaxgpt serve` beside `transformers serve --continuous-batching` on the same weights.

GPT-2 124M shape, random weights saved with jaxgpt.save_hf (with GPT-2's tokenizer files),
float32 on this machine's CPU. One server runs at a time (started, warmed up, measured at
every level, stopped; an idle `transformers serve` holds ~13 GB) and each gets the same
request stream at each concurrency:
`--requests` streamed /v1/completions, prompts cut from the embedded Shakespeare plays
(`--min-prompt`..`--max-prompt` GPT-2 tokens, seeded), greedy, `--max-tokens` new tokens.
Figures follow vLLM's benchmark_serving definitions: TTFT (request sent to first text),
TPOT ((latency - TTFT) / (output tokens - 1), per request), ITL (gaps between streamed
chunks with text, all requests pooled; jaxgpt sends a decode chunk of up to 4 tokens per
event, transformers one event per read of its queue), output tokens/s (all output tokens
over the wall time of the level), p50 and p99. Last, the floor the matmuls set for the
highest level, timed in JAX in this process: the linear layers of the prefill of every
prompt as one batch (all rows at once, the shape matmuls run fastest at), then, for every
decode step the level needs, the time to read all the float32 weights and as many keys and
values as the live rows have on average (which each step must read at least once) at the
read bandwidth bench/generate.py measures. Attention's arithmetic, sampling and every
other op are left out.

    PYTHONPATH=src python bench/serve.py [--concurrency 1 4 16] [--requests 32] [--max-tokens 64]
"""

import argparse
import asyncio
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def save_weights(path: Path) -> None:
    import jax

    import jaxgpt

    cfg = jaxgpt.GPTConfig()  # GPT-2 124M
    jaxgpt.save_hf(cfg, jaxgpt.init_params(cfg, jax.random.key(0)), path, tokenizer=jaxgpt.get_tokenizer("gpt2"))


def prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    import jaxgpt
    from jaxgpt import sources

    tok = jaxgpt.get_tokenizer("gpt2")
    ids = tok.encode("".join(sources.shakespeare_documents())[:400_000])
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length, start = int(rng.integers(lo, hi + 1)), int(rng.integers(0, len(ids) - hi))
        out.append(tok.decode(ids[start : start + length]))
    return out


def floor_seconds(prompt_lengths: list[int], new_tokens: int, rows: int, repeats: int = 5) -> tuple[float, float]:
    """Seconds (the best of `repeats`, JAX on this CPU) of GPT-2 124M's linear layers over all
    the prompts' tokens but their last at once, and of the reads every decode step must
    make, all the weights and the live rows' keys and values, at this CPU's read bandwidth."""
    import jax
    from generate import read_bandwidth

    from jaxgpt import GPTConfig, model

    cfg = GPTConfig()  # the served model's shape (save_weights)
    D, rng = cfg.n_embd, np.random.default_rng(0)
    params = jax.eval_shape(functools.partial(model.init_params, cfg), jax.random.key(0))
    shapes = [w.shape for w in jax.tree.leaves(params["h"]) if w.ndim == 2]  # the blocks' weight matrices
    blocks = jax.device_put([rng.standard_normal(s, np.float32) for s in shapes])
    prefilled = sum(prompt_lengths) - len(prompt_lengths)
    inputs = {k: jax.device_put(rng.standard_normal((prefilled, k), np.float32)) for k in {k for k, _ in shapes}}
    # each matmul's input is an argument of its width, so XLA can fold none away
    prefill = jax.jit(lambda xs, ws: [xs[w.shape[0]] @ w for w in ws])
    jax.block_until_ready(prefill(inputs, blocks))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(prefill(inputs, blocks))
        best = min(best, time.perf_counter() - t)

    steps = new_tokens * -(-len(prompt_lengths) // rows)
    # key and value slots read over the decode: a sequence reads its length so far at every step
    slots = sum(n * new_tokens + new_tokens * (new_tokens - 1) // 2 for n in prompt_lengths)
    weight_floats = sum(k * n for k, n in shapes) + model.output_embedding(params).size
    step_bytes = 4 * (weight_floats + slots // steps * cfg.n_layer * 2 * D)
    return best, steps * step_bytes / read_bandwidth(step_bytes)


def start(name: str, command: list[str], port: int, log: Path) -> subprocess.Popen:
    print(f"starting {name}: {' '.join(command)}", flush=True)
    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.perf_counter()
    while True:
        if proc.poll() is not None:
            sys.exit(f"{name} exited with {proc.returncode}; its output is in {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    print(f"{name} ready after {time.perf_counter() - t0:.1f} s", flush=True)
    return proc


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    times, tokens, text = [], None, ""
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or []:
                if choice.get("text"):
                    times.append(time.perf_counter())
                    text += choice["text"]
    done = time.perf_counter()
    return {"sent": sent, "times": times, "done": done, "tokens": tokens, "text": text}


async def run_level(url: str, model: str, prompt_texts: list[str], concurrency: int, max_tokens: int) -> dict:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        async def limited(p):
            async with limit:
                return await one_request(http, model, p, max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*map(limited, prompt_texts))
        wall = time.perf_counter() - t0
    ttft = [r["times"][0] - r["sent"] for r in results]
    tpot = [(r["done"] - r["times"][0]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    out_tokens = sum(r["tokens"] for r in results)
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    return {"concurrency": concurrency, "requests": len(results), "output_tokens": out_tokens, "wall_s": wall,
            "output_tok_s": out_tokens / wall, "ttft_p50": pct(ttft, 50), "ttft_p99": pct(ttft, 99),
            "tpot_p50": pct(tpot, 50), "tpot_p99": pct(tpot, 99), "itl_p50": pct(itl, 50), "itl_p99": pct(itl, 99),
            "texts": [r["text"] for r in results]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--slots", type=int, default=16, help="jaxgpt serve --slots")
    ap.add_argument("--servers", nargs="+", default=["jaxgpt", "transformers"], choices=["jaxgpt", "transformers"])
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    import torch
    import transformers

    import jax

    import jaxgpt

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    weights = work / "gpt2-random"
    save_weights(weights)
    texts = prompts(args.requests, args.min_prompt, args.max_prompt)
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}, {os.cpu_count()} CPUs; GPT-2 124M random weights in {weights}; "
          f"{args.requests} requests, prompts {args.min_prompt}-{args.max_prompt} tokens, {args.max_tokens} new "
          "tokens, greedy, streamed", flush=True)
    bin_dir = Path(sys.executable).parent
    commands = {
        "jaxgpt": ([str(bin_dir / "jaxgpt"), "serve", "--init-from", str(weights), "--slots", str(args.slots),
                    "--port"], weights.name),
        "transformers": ([str(bin_dir / "transformers"), "serve", "--continuous-batching", "--device", "cpu",
                          str(weights), "--port"], str(weights)),
    }
    rows = []
    for name in args.servers:
        command, model = commands[name]
        port = free_port()
        proc = start(name, command + [str(port)], port, work / f"{name}.log")
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(run_level(url, model, texts[:4], 4, 8))  # warm-up, untimed: first-request set-up
            for c in args.concurrency:
                r = asyncio.run(run_level(url, model, texts, c, args.max_tokens))
                rows.append({"server": name} | r)
                print(f"{name:12s} c={c:3d}: {r['output_tok_s']:7.1f} output tok/s, TTFT p50/p99 "
                      f"{r['ttft_p50']:.3f}/{r['ttft_p99']:.3f} s, TPOT p50/p99 {1e3 * r['tpot_p50']:.0f}/"
                      f"{1e3 * r['tpot_p99']:.0f} ms, ITL p50/p99 {1e3 * r['itl_p50']:.0f}/{1e3 * r['itl_p99']:.0f} ms, "
                      f"{r['output_tokens']} tokens in {r['wall_s']:.1f} s", flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    if len(args.servers) == 2:
        last = [next(r for r in rows if r["server"] == s and r["concurrency"] == args.concurrency[-1])
                for s in args.servers]
        same = sum(a == b for a, b in zip(*(r["texts"] for r in last)))
        print(f"greedy texts equal between the servers at the last level: {same} of {args.requests}")
        for c in args.concurrency:
            j, t = (next(r for r in rows if r["server"] == s and r["concurrency"] == c) for s in args.servers)
            print(f"c={c}: {args.servers[0]} output tok/s {j['output_tok_s'] / t['output_tok_s']:.2f}x "
                  f"{args.servers[1]}'s, TTFT p99 {j['ttft_p99']:.2f} s vs {t['ttft_p99']:.2f} s")
    tok = jaxgpt.get_tokenizer("gpt2")
    lengths = [len(tok.encode(t)) for t in texts]
    prefill_s, reads_s = floor_seconds(lengths, args.max_tokens, min(args.concurrency[-1], args.slots))
    print(f"floor of the stream at c={args.concurrency[-1]} (JAX, this CPU): the linear layers of the prefill of "
          f"{sum(lengths) - len(lengths)} prompt tokens at once {prefill_s:.2f} s, the decode steps' reads of the "
          f"weights and the keys and values {reads_s:.2f} s; no server takes less than {prefill_s + reads_s:.2f} s",
          flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "texts"} for r in rows], indent=1))


if __name__ == "__main__":
    main()

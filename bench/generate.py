"""Generation speed: jaxgpt vs transformers' GPT2LMHeadModel.generate on the same weights.

GPT-2 124M shape, random weights, float32 on CPU, greedy, prompt 16 tokens, 256 new tokens,
batch 1 and 8, the two libraries interleaved in one process. Batch 1 is bound by memory
bandwidth (each step reads all ~0.5 GB of weights), so it also prints the fraction of that
roofline reached, with the bandwidth measured in the same run.

    PYTHONPATH=src python bench/generate.py [--reps 3] [--new-tokens 256]
"""

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import jaxgpt
from jaxgpt.generate import generate, generate_stream


def read_bandwidth(n_bytes: int = 1 << 29, reps: int = 5) -> float:
    """Bytes/s of summing a large float32 array: the best of numpy (one core) and XLA."""
    x = np.ones(n_bytes // 4, np.float32)
    x_jax = jnp.asarray(x)
    jax_sum = jax.jit(jnp.sum)
    jax_sum(x_jax).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        for f in (lambda: x.sum(), lambda: jax_sum(x_jax).block_until_ready()):
            t = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t)
    return n_bytes / best


def timed(f):
    t = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--engines", nargs="+", default=["jaxgpt", "transformers"], choices=["jaxgpt", "transformers"],
                    help="jaxgpt alone for a before/after of jaxgpt (see bench/ab.py)")
    args = ap.parse_args()
    N = args.new_tokens

    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, float32 CPU, greedy, "
          f"prompt {args.prompt_tokens}, {N} new tokens")
    bandwidth = read_bandwidth()
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    hf.generation_config.eos_token_id = None  # always generate all N tokens
    hf.generation_config.pad_token_id = 0
    with tempfile.TemporaryDirectory() as tmp:  # jaxgpt reads the same weights as HF saves them
        hf.save_pretrained(tmp)
        cfg, params = jaxgpt.load_hf(tmp)
    weight_bytes = 4 * jaxgpt.count_params(params, non_embedding=True)  # wpe: one row a step
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s; weights {weight_bytes / 1e9:.2f} GB read a step "
          f"-> batch-1 roofline {bandwidth / weight_bytes:.1f} tok/s")

    rng = np.random.default_rng(0)
    prompts = {B: rng.integers(0, cfg.vocab_size, (B, args.prompt_tokens)).tolist() for B in args.batches}

    def run_jax(B):
        return generate(params, cfg, prompts[B], N, temperature=0)

    def run_hf(B):
        with torch.inference_mode():
            ids = torch.tensor(prompts[B])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N,
                              do_sample=False, use_cache=True)
        return out[:, args.prompt_tokens:].tolist()

    def first_token():
        return next(generate_stream(params, cfg, prompts[B], N, temperature=0))

    compile_s = []

    def on_event(event, seconds, **kwargs):
        if event.startswith("/jax/core/compile/"):  # tracing, lowering, XLA compilation
            compile_s.append(seconds)

    results = {B: {"jax": [], "hf": [], "ttft": []} for B in args.batches}
    jax.monitoring.register_event_duration_secs_listener(on_event)
    for B in args.batches:
        compile_s.clear()
        out_jax = run_jax(B)
        first_token()
        print(f"batch {B}: compile {sum(compile_s):.1f} s (trace, lower and compile, first request only)")
        if "transformers" not in args.engines:
            continue
        out_hf = run_hf(B)
        agree = [next((i for i, (a, b) in enumerate(zip(r, s)) if a != b), N) for r, s in zip(out_jax, out_hf)]
        print(f"batch {B}: greedy tokens equal to transformers' for the first {min(agree)} of {N} (all rows)")
    jax.monitoring.unregister_event_duration_listener(on_event)
    for rep in range(args.reps):
        for B in args.batches:
            results[B]["jax"].append(timed(lambda: run_jax(B))[1])
            if "transformers" in args.engines:
                results[B]["hf"].append(timed(lambda: run_hf(B))[1])
            results[B]["ttft"].append(timed(first_token)[1])
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
            f"batch {B} jax {results[B]['jax'][-1]:.2f} s hf {(results[B]['hf'] or [float('nan')])[-1]:.2f} s"
            for B in args.batches))

    print("\n| batch | jaxgpt tok/s | transformers tok/s | ratio | jaxgpt ms/token step | time to first token | roofline |")
    print("|---|---|---|---|---|---|---|")
    for B in args.batches:
        t_jax, t_hf = (statistics.median(results[B][k] or [float("nan")]) for k in ("jax", "hf"))
        ttft = statistics.median(results[B]["ttft"])
        roofline = f"{(N / t_jax) / (bandwidth / weight_bytes):.0%}" if B == 1 else ""
        print(f"| {B} | {B * N / t_jax:.1f} | {B * N / t_hf:.1f} | {t_hf / t_jax:.2f}x | "
              f"{t_jax / N * 1e3:.1f} | {ttft * 1e3:.0f} ms | {roofline} |")


if __name__ == "__main__":
    main()

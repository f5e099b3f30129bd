"""Profile jaxgpt's greedy decoding and print the XLA kernels that take the time.

    PYTHONPATH=src python bench/profile_decode.py [--new-tokens 256] [--batch 1] [--dtype float32]

GPT-2 124M shape, random weights, float32, a 16-token prompt. Traces one whole
`jaxgpt.generate` call (one compiled loop of decode steps) and sums its kernel events by
name per decode step, beside the step's wall time; kernels of the two cores' threads
may overlap, so their sum can pass the wall time. To see which dot is which, run with
`XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text` and look the names up in
DIR/*jit_decode.cpu_after_optimizations.txt (each cache size is its own module).
"""

import argparse
import time

import jax
import numpy as np
from profile_step import print_kernels

import jaxgpt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default="/tmp/jaxgpt-profile-decode")
    args = ap.parse_args()
    N = args.new_tokens

    cfg = jaxgpt.GPTConfig()
    params = jax.tree.map(lambda a: a.astype(args.dtype), jaxgpt.init_params(cfg, jax.random.key(0)))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.prompt_tokens)).tolist()
    weight_mb = jax.numpy.dtype(args.dtype).itemsize * jaxgpt.count_params(params, non_embedding=True) / 1e6
    jaxgpt.generate(params, cfg, prompt, N, temperature=0)  # compile
    times = []
    for _ in range(3):
        t = time.perf_counter()
        jaxgpt.generate(params, cfg, prompt, N, temperature=0)
        times.append(time.perf_counter() - t)
    print(f"untraced: best {1e3 * min(times) / N:.2f} ms/token over {N} tokens ({weight_mb:.0f} MB of weights read a step)")
    with jax.profiler.trace(args.out, create_perfetto_trace=True):
        t = time.perf_counter()
        jaxgpt.generate(params, cfg, prompt, N, temperature=0)
        wall = time.perf_counter() - t
    print(f"traced: {1e3 * wall / N:.2f} ms/token")
    print_kernels(args.out, N, top=30)


if __name__ == "__main__":
    main()

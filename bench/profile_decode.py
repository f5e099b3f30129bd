"""Profile jaxgpt's greedy decoding and print the XLA kernels that take the time.

    PYTHONPATH=src python bench/profile_decode.py [--new-tokens 256] [--batch 1] [--dtype float32]

GPT-2 124M shape, random weights, float32, a 16-token prompt. First the step's floor on
this machine: its weight matmuls alone (every block's dense layers and the output layer,
through the same code as a decode step, in a compiled loop), then the whole step. Then it
traces one whole `jaxgpt.generate` call (one compiled loop of decode steps) and sums its
kernel events by name per decode step; kernels of the two cores' threads may overlap, so
their sum can pass the wall time. To see which dot is which, run with
`XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text` and look the names up in
DIR/*jit_decode.cpu_after_optimizations.txt (each cache size is its own module).
"""

import argparse
import time

import jax
import numpy as np
from profile_step import print_kernels

import jaxgpt
from jaxgpt import decode, model


def matmuls_alone(params, cfg, batch: int, steps: int = 32) -> float:
    """Seconds a step of a decode step's weight matmuls and nothing else: model._dense on
    the kernels as decoding stores them, then decode.last_logits, in a compiled loop."""
    p = decode.transpose_kernels(params)
    D = cfg.n_embd

    def step(_, x_BD):
        for b in p["h"]:
            x_BD = x_BD + 1e-3 * model._dense(b["attn"]["c_attn"], x_BD)[:, :D]
            x_BD = x_BD + 1e-3 * model._dense(b["attn"]["c_proj"], x_BD)
            x_BD = x_BD + 1e-3 * model._dense(b["mlp"]["c_proj"], jax.nn.gelu(model._dense(b["mlp"]["c_fc"], x_BD)))
        return x_BD + 1e-6 * decode.last_logits(p, x_BD, batch, cfg)[:, :D].astype(x_BD.dtype)

    run = jax.jit(lambda x_BD: jax.lax.fori_loop(0, steps, step, x_BD))
    x_BD = jax.numpy.ones((batch, D), params["wte"].dtype)
    jax.block_until_ready(run(x_BD))
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(run(x_BD))
        best = min(best, time.perf_counter() - t)
    return best / steps


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
    floor = matmuls_alone(params, cfg, args.batch)
    print(f"batch {args.batch}, {args.dtype}: the weight matmuls alone {1e3 * floor:.2f} ms a step; "
          f"the whole step (generate, untraced) best {1e3 * min(times) / N:.2f} ms over {N} tokens "
          f"({weight_mb:.0f} MB of weights read a step)")
    with jax.profiler.trace(args.out, create_perfetto_trace=True):
        t = time.perf_counter()
        jaxgpt.generate(params, cfg, prompt, N, temperature=0)
        wall = time.perf_counter() - t
    print(f"traced: {1e3 * wall / N:.2f} ms a step")
    print_kernels(args.out, N, top=30)


if __name__ == "__main__":
    main()

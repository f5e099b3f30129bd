"""Profile one jitted training step and print the XLA kernels that take the time.

    python bench/profile_step.py [PRESET] [--steps N]

Writes a perfetto trace under /tmp/jaxgpt-profile and sums its kernel events by name.
"""

import argparse
import collections
import gzip
import json
import pathlib
import time

import jax
import numpy as np

from jaxgpt import config, model, optim, step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("preset", nargs="?", default="shakespeare-char-cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="/tmp/jaxgpt-profile")
    args = ap.parse_args()

    cfg = config.load(args.preset)
    opt = optim.make_optimizer(cfg.optim)
    params = model.init_params(cfg.model, jax.random.key(0))
    opt_state = opt.init(params)
    train_step = step.make_train_step(cfg, opt)
    B, T, V = cfg.data.batch_size, cfg.model.block_size, cfg.model.vocab_size
    x = np.random.default_rng(0).integers(0, V, (cfg.train.grad_accum, B, T)).astype(np.int32)
    print("cost analysis GFLOP/step:", train_step.lower(params, opt_state, x, x, 0).compile().cost_analysis()["flops"] / 1e9)
    for i in range(5):
        params, opt_state, loss, _ = train_step(params, opt_state, x, x, i)
    loss.block_until_ready()
    times = []
    with jax.profiler.trace(args.out, create_perfetto_trace=True):
        for i in range(args.steps):
            t = time.perf_counter()
            params, opt_state, loss, _ = train_step(params, opt_state, x, x, i)
            loss.block_until_ready()
            times.append(time.perf_counter() - t)
    print(f"median {1000 * np.median(times):.1f} ms/step over {args.steps} steps")

    print_kernels(args.out, args.steps)


def print_kernels(out_dir: str, steps: int, top: int = 15) -> None:
    """Sums the XLA kernels of the newest perfetto trace under `out_dir` by name, per step."""
    trace = max(pathlib.Path(out_dir).rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    kernels = [e for e in events if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(("$", "Thunk", "Pjit", "Common", "np."))]
    by_kind, by_name = collections.Counter(), collections.Counter()
    for e in kernels:
        by_name[e["name"]] += e["dur"] / 1000 / steps
        by_kind[e["name"].split(".")[0]] += e["dur"] / 1000 / steps
    print(f"kernels sum to {sum(by_kind.values()):.2f} ms/step")
    for title, table in (("kind", by_kind), ("kernel", by_name)):
        print(f"{'ms/step':>8}  {title}")
        for name, ms in table.most_common(top):
            print(f"{ms:8.2f}  {name[:90]}")


if __name__ == "__main__":
    main()

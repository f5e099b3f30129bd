"""The shakespeare-char-cpu preset beside nanoGPT's own train.py, in one invocation.

    python bench/shakespeare_cpu.py --nanogpt PATH [--rounds 8] [--skip-step] [--warm]

1. The step alone: jaxgpt's jitted step and the same model in PyTorch eager
   (bench/torch_gpt.py), alternating blocks of 25 steps on the same batches. Then the
   step's matmuls alone (every GEMM and batched dot of its forward and backward, nothing
   else), as one jitted JAX program and in PyTorch, alternating: the floor each library's
   matmuls set under the step.
2. The whole process, one after the other on the same token files: nanoGPT's train.py
   (PATH, a karpathy/nanoGPT checkout; its README CPU command) and `jaxgpt train
   shakespeare-char-cpu` (with an empty XLA cache; --warm runs it again with the cache
   filled). For each: wall time, time to the end of the first step, median ms/step, time
   in evaluations and checkpoint saves, and the val loss at 2000.

Reads tiny Shakespeare from ../shared/data where there is a copy, else downloads it; works in a
temporary directory.
"""

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nanogpt  # noqa: E402


def side_by_side(data_dir: Path, rounds: int, steps: int = 30) -> tuple[list[float], list[float]]:
    """ms/step of jaxgpt (on the preset's devices, `train.steps_per_call` steps a call as its
    training loop runs them) and of PyTorch eager (one step a call), alternating on the same
    batches."""
    import dataclasses

    import jax
    import torch
    import torch_gpt

    from jaxgpt import config, data, model, optim, sharding, step, train

    cfg = config.load("shakespeare-char-cpu")
    sharding.request_cpu_devices(cfg.mesh, cfg.data.batch_size, print)  # before JAX starts
    ds = data.open_dataset(data_dir)
    cfg = train.with_data_vocab(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=str(data_dir))), ds)
    torch.manual_seed(0)
    torch_step, _ = torch_gpt.make_step(cfg)
    opt = optim.make_optimizer(cfg.optim)
    sh = step.shardings(cfg, opt, sharding.make_mesh(cfg.mesh))
    params = jax.jit(model.init_params, static_argnums=0, out_shardings=sh["params"])(cfg.model, jax.random.key(0))
    opt_state = jax.jit(opt.init, out_shardings=sh["opt_state"])(params)
    jax_steps, K = step.make_train_steps(cfg, opt, sh), cfg.train.steps_per_call
    batches = [step.train_batch(ds, cfg, i) for i in range(steps)]
    blocks = [tuple(np.stack(a) for a in zip(*batches[i:i + K])) for i in range(0, steps, K)]
    print(f"step alone: jaxgpt on {jax.device_count()} CPU device(s), {K} steps a call; torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads", flush=True)
    jax_ms, torch_ms = [], []
    for r in range(rounds + 1):  # round 0 warms up (compilation, allocator)
        for x, y in blocks:
            t = time.perf_counter()
            params, opt_state, loss_K, _ = jax_steps(params, opt_state, jax.device_put(x, sh["batches"]),
                                                     jax.device_put(y, sh["batches"]), 0)
            float(loss_K[-1])
            if r:
                jax_ms += [1000 * (time.perf_counter() - t) / len(x)] * len(x)
        for x, y in batches:
            t = time.perf_counter()
            torch_step(x[0], y[0])
            if r:
                torch_ms.append(1000 * (time.perf_counter() - t))
    return jax_ms, torch_ms


def step_matmuls(m, batch_size: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(lhs, rhs) shapes of every matmul in one training step of model config `m`: each of
    the model's weight matrices (the blocks' and the output layer's) as x·W, with its
    backward's dY·Wᵀ and xᵀ·dY; attention's q·kᵀ and p·v per head, with their backward's two
    dots each."""
    import functools

    import jax

    from jaxgpt import model

    params = jax.eval_shape(functools.partial(model.init_params, m), jax.random.key(0))
    weights = [w.shape for w in jax.tree.leaves(params["h"]) if w.ndim == 2]
    weights.append(model.output_embedding(params).shape[::-1])
    T, hd = m.block_size, m.n_embd // m.n_head
    N, BH = batch_size * T, batch_size * m.n_head
    shapes = []
    for k, n in weights:
        shapes += [((N, k), (k, n)), ((N, n), (n, k)), ((k, N), (N, n))]
    for (a, b), (_, d) in [((T, hd), (hd, T)), ((T, T), (T, hd))] * m.n_layer:
        shapes += [((BH, a, b), (BH, b, d)), ((BH, a, d), (BH, d, b)), ((BH, b, a), (BH, a, d))]
    return shapes


def matmuls_side_by_side(m, batch_size: int, rounds: int, calls: int = 20) -> tuple[float, list[float], list[float]]:
    """GFLOP and ms of the step's matmuls alone, JAX (one jitted program on one device) and
    PyTorch, alternating rounds of `calls` calls."""
    import jax
    import torch

    rng = np.random.default_rng(0)
    arrays = [(rng.standard_normal(a, np.float32), rng.standard_normal(b, np.float32))
              for a, b in step_matmuls(m, batch_size)]
    gflop = sum(2 * a.size * b.shape[-1] for a, b in arrays) / 1e9
    jax_arrays = jax.device_put(arrays, jax.devices()[0])
    torch_arrays = [(torch.from_numpy(a), torch.from_numpy(b)) for a, b in arrays]
    jax_all = jax.jit(lambda pairs: [a @ b for a, b in pairs])
    jax_ms, torch_ms = [], []
    for r in range(rounds + 1):  # round 0 warms up
        t = time.perf_counter()
        for _ in range(calls):
            out = jax_all(jax_arrays)
        jax.block_until_ready(out)
        jax_ms.append(1000 * (time.perf_counter() - t) / calls)
        t = time.perf_counter()
        for _ in range(calls):
            [a @ b for a, b in torch_arrays]
        torch_ms.append(1000 * (time.perf_counter() - t) / calls)
    return gflop, jax_ms[1:], torch_ms[1:]


def first_step_s(lines) -> float:
    return next(t for t, s in lines if s.startswith("iter 0:"))


def nanogpt_process(nanogpt_dir: Path, work: Path) -> dict:
    run = work / "nanogpt"
    run.mkdir()
    nanogpt.copy_nanogpt(nanogpt_dir, run)
    (run / "data").symlink_to(work / "data")
    wall, lines = nanogpt.run_timed(nanogpt.nanogpt_command(run / "out"), run)
    ms = {int(m.group(1)): float(m.group(2)) for _, s in lines if (m := re.match(r"iter (\d+): .*time ([\d.]+)ms", s))}
    median = statistics.median(v for it, v in ms.items() if it % 250)
    # An iteration that evaluates (every 250) times its evaluation and its checkpoint save too.
    extra = sum(v - median for it, v in ms.items() if it % 250 == 0 and it > 0) / 1000
    return {"wall": wall, "first_step": first_step_s(lines), "ms_per_step": median, "evals_and_saves": extra,
            "val_loss": nanogpt.final_val_loss(lines)}


def jaxgpt_process(data_dir: Path, run_dir: Path, cache: Path) -> dict:
    cmd = [sys.executable, "-u", "-m", "jaxgpt.cli", "train", "shakespeare-char-cpu", "--data-dir", str(data_dir),
           "--out-dir", str(run_dir)]
    wall, lines = nanogpt.run_timed(cmd, run_dir.parent, {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache)})
    records = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = json.loads((run_dir / "run.json").read_text())["seconds"]
    return {"wall": wall, "first_step": first_step_s(lines),
            "ms_per_step": statistics.median(r["ms_per_step"] for r in records if "ms_per_step" in r and r["step"] > 0),
            "evals": seconds["evals"], "saves": seconds["checkpoint_saves"], "val_loss": nanogpt.final_val_loss(lines),
            "devices": len(json.loads((run_dir / "run.json").read_text())["devices"])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", type=Path, help="a karpathy/nanoGPT checkout (its train.py needs torch)")
    ap.add_argument("--rounds", type=int, default=8, help="alternating blocks in the step-alone timing")
    ap.add_argument("--skip-step", action="store_true", help="only the whole processes")
    ap.add_argument("--warm", action="store_true", help="run jaxgpt a second time with its XLA cache filled")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="jaxgpt-bench-"))
    data_dir = nanogpt.prepare_tinyshakespeare(work)
    if args.nanogpt:
        runs = {"nanoGPT": nanogpt_process(args.nanogpt.resolve(), work),
                "jaxgpt": jaxgpt_process(data_dir, work / "run", work / "xla-cache")}
        if args.warm:
            runs["jaxgpt, XLA cache warm"] = jaxgpt_process(data_dir, work / "run-warm", work / "xla-cache")
        ref = runs["nanoGPT"]["wall"]
        print("whole process, 2000 iterations (seconds):")
        for name, r in runs.items():
            spent = (f"evals {r['evals']:.1f}, checkpoint saves {r['saves']:.1f}, {r['devices']} CPU devices"
                     if "evals" in r else f"evals and checkpoint saves {r['evals_and_saves']:.1f}")
            print(f"  {name:>24}: wall {r['wall']:6.1f} ({r['wall'] / ref:.2f}x nanoGPT), first step done at "
                  f"{r['first_step']:.1f}, median {r['ms_per_step']:.1f} ms/step, {spent}; "
                  f"val loss {r['val_loss']:.4f}", flush=True)
    if not args.skip_step:
        jax_ms, torch_ms = side_by_side(data_dir, args.rounds)
        print(f"step alone, {len(jax_ms)} steps each: jaxgpt median {np.median(jax_ms):.1f} ms/step, "
              f"PyTorch eager median {np.median(torch_ms):.1f} ms/step, "
              f"jaxgpt / PyTorch {np.median(jax_ms) / np.median(torch_ms):.2f}x")
        from jaxgpt import config

        cfg = config.load("shakespeare-char-cpu")  # its vocab_size is tiny Shakespeare's 65 characters
        gflop, jax_mm, torch_mm = matmuls_side_by_side(cfg.model, cfg.data.batch_size, args.rounds)
        print(f"the step's {len(step_matmuls(cfg.model, cfg.data.batch_size))} matmuls alone ({gflop:.2f} GFLOP): "
              f"JAX median {np.median(jax_mm):.1f} ms ({gflop / np.median(jax_mm) * 1e3:.0f} GFLOP/s), "
              f"PyTorch median {np.median(torch_mm):.1f} ms ({gflop / np.median(torch_mm) * 1e3:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()

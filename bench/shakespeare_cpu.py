"""The shakespeare-char-cpu preset on tiny Shakespeare: val loss at 2000 iterations and
ms/iteration, with a side-by-side timing against the same model in PyTorch eager.

    python bench/shakespeare_cpu.py [--iters 2000] [--skip-train] [--rounds 8]

Reads ../shared/data/tinyshakespeare.txt; writes the run under a temporary directory.
"""

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jaxgpt import checkpoint, config, data, model, optim, prepare, sources, step, train

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def side_by_side(cfg, ds, rounds: int, steps: int) -> tuple[list[float], list[float]]:
    """ms/step of jaxgpt and of PyTorch eager, in alternating blocks on the same batches."""
    import jax
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import torch_gpt

    torch.manual_seed(0)
    torch_step, _ = torch_gpt.make_step(cfg)
    opt = optim.make_optimizer(cfg.optim)
    params = jax.jit(model.init_params, static_argnums=0)(cfg.model, jax.random.key(0))
    opt_state = opt.init(params)
    jax_step = step.make_train_step(cfg, opt)
    batches = [step.train_batch(ds, cfg, i) for i in range(steps)]
    jax_ms, torch_ms = [], []
    for r in range(rounds + 1):  # round 0 warms up (compilation, allocator)
        for x, y in batches:
            t = time.perf_counter()
            params, opt_state, loss, _ = jax_step(params, opt_state, x, y, 0)
            float(loss)
            if r:
                jax_ms.append(1000 * (time.perf_counter() - t))
        for x, y in batches:
            t = time.perf_counter()
            torch_step(x[0], y[0])
            if r:
                torch_ms.append(1000 * (time.perf_counter() - t))
    return jax_ms, torch_ms


def torch_train(cfg, ds, seed: int) -> float:
    """Val loss of the same model trained in PyTorch on jaxgpt's batches and lr schedule."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import torch_gpt

    torch.manual_seed(seed)
    torch_step, evaluate = torch_gpt.make_step(cfg)
    schedule = optim.lr_schedule(cfg.optim)
    for it in range(cfg.train.max_iters):
        x, y = step.train_batch(ds, cfg, it)
        torch_step(x[0], y[0], float(schedule(it)))
    B, T = cfg.data.batch_size, cfg.model.block_size
    losses = [evaluate(*data.get_batch(ds, "val", B, T, cfg.train.seed, step.EVAL_STREAM + i))
              for i in range(cfg.train.eval_iters)]
    return float(np.mean(losses))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=8, help="alternating blocks in the side-by-side timing")
    ap.add_argument("--skip-train", action="store_true", help="only the side-by-side timing")
    ap.add_argument("--torch-seeds", type=int, default=0,
                    help="also train the PyTorch model this many times on the same batches and schedule")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="jaxgpt-bench-"))
    prepare.prepare(sources.resolve_source("tinyshakespeare", str(CORPUS)), work / "data")
    ds = data.open_dataset(work / "data")
    cfg = config.load("shakespeare-char-cpu")
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, dir=str(work / "data")),
        train=dataclasses.replace(cfg.train, out_dir=str(work / "run"), max_iters=args.iters, log_interval=1),
    )
    cfg = train.with_data_vocab(cfg, ds)

    jax_ms, torch_ms = side_by_side(cfg, ds, args.rounds, 25)
    print(f"side by side, {len(jax_ms)} steps each: jaxgpt median {np.median(jax_ms):.1f} ms/step, "
          f"PyTorch eager median {np.median(torch_ms):.1f} ms/step, "
          f"ratio {np.median(torch_ms) / np.median(jax_ms):.2f}x")
    if args.skip_train:
        return

    t0 = time.perf_counter()
    result = train.train(cfg, log=lambda s: None)
    wall = time.perf_counter() - t0
    records = [json.loads(s) for s in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    ms = [r["ms_per_step"] for r in records if "ms_per_step" in r and r["step"] > 0]
    _, params, _ = checkpoint.load_params(work / "run", "latest")
    exact = step.evaluate_split(params, ds, cfg, "val")
    print(f"train {args.iters} iters: val loss {result['val_loss']:.4f} (estimate over {cfg.train.eval_iters} "
          f"batches, as nanoGPT reports), exact val loss {exact['loss']:.4f} over the whole split; "
          f"median {np.median(ms):.1f} ms/iter (p10 {np.percentile(ms, 10):.1f}, p90 {np.percentile(ms, 90):.1f}); "
          f"wall {wall:.0f} s")
    for seed in range(args.torch_seeds):
        print(f"PyTorch eager, same batches and schedule, torch seed {seed}: val loss {torch_train(cfg, ds, seed):.4f} "
              f"(estimate over the same {cfg.train.eval_iters} batches)")


if __name__ == "__main__":
    main()

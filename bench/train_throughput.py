"""Training throughput and MFU at GPT-2 124M's shape, side by side with transformers.

    python bench/train_throughput.py                      # CPU: batch 4 × seq 256, against GPT2LMHeadModel
    python bench/train_throughput.py --batch 16 --seq 1024 --no-torch --remat block   # a GPU

One jaxgpt step is step.make_train_step (AdamW, clipping, compute dtype, remat, the
mesh of all devices); one transformers step is forward + backward + torch.optim.AdamW
on the same token batch. The two alternate in rounds, so the machine's noise hits both.
MFU counts model.flops_per_token (6·N + 12·L·T·D) against flops.peak_flops.
"""

import argparse
import dataclasses
import time

import jax
import numpy as np

from jaxgpt import config, flops, model, optim, sharding, step
from jaxgpt import hf as hf_lib
from jaxgpt.config import GPTConfig


def jax_step_fn(cfg: config.Config):
    """A closure running one jaxgpt training step on a fixed batch; returns when it is done."""
    opt = optim.make_optimizer(cfg.optim)
    mesh = sharding.make_mesh(cfg.mesh)
    sh = step.shardings(cfg, opt, mesh)
    params = jax.jit(model.init_params, static_argnums=0, out_shardings=sh["params"])(cfg.model, jax.random.key(0))
    state = {"params": params, "opt": jax.jit(opt.init, out_shardings=sh["opt_state"])(params)}
    train_step = step.make_train_step(cfg, opt, sh)
    B, T = cfg.data.batch_size, cfg.model.block_size
    x = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (1, B, T)).astype(np.int32)
    x = jax.device_put(x, sh["batch"])

    def run():
        state["params"], state["opt"], loss, _ = train_step(state["params"], state["opt"], x, x, 0)
        return float(loss)

    return run


def torch_step_fn(mcfg: GPTConfig, B: int):
    import torch
    import transformers

    torch.manual_seed(0)
    hf_config = hf_lib.config_to_hf(dataclasses.replace(mcfg, dropout=0.0))
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config))
    opt = torch.optim.AdamW(hf.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.randint(0, mcfg.vocab_size, (B, mcfg.block_size))

    def run():
        loss = hf(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jax-steps", type=int, default=2, help="jaxgpt steps per round")
    ap.add_argument("--compute-dtype", default="auto")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()

    mcfg = GPTConfig(block_size=args.seq)
    cfg = config.Config(model=mcfg, data=config.DataConfig(batch_size=args.batch),
                        train=dataclasses.replace(config.TrainConfig(), compute_dtype=args.compute_dtype,
                                                  remat=args.remat))
    cfg = config.from_dict(config.to_dict(cfg))  # validates the choices
    dtype = step.compute_dtype(cfg.train.compute_dtype, sharding.make_mesh(cfg.mesh))
    tokens = args.batch * args.seq
    flops_per_step = model.flops_per_token(mcfg) * tokens
    peak = flops.peak_flops(jax.devices(), dtype)
    print(f"{jax.device_count()} × {jax.devices()[0].device_kind}, compute {jax.numpy.dtype(dtype).name}, "
          f"remat {args.remat}; batch {args.batch} × seq {args.seq}; "
          f"{flops_per_step / 1e9:.0f} GFLOP/step by 6N + 12LTD; peak {peak / 1e9:,.0f} GFLOP/s", flush=True)

    steps = {"jaxgpt": jax_step_fn(cfg)}
    if not args.no_torch:
        import torch

        steps["transformers"] = torch_step_fn(mcfg, args.batch)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    t = time.perf_counter()
    for name, run in steps.items():  # warm-up: compilation, allocators
        t = time.perf_counter()
        run()
        print(f"{name} first step (compile/warm-up) {time.perf_counter() - t:.1f} s", flush=True)
    times = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, run in steps.items():
            for _ in range(args.jax_steps if name == "jaxgpt" else 1):
                t = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t)
        print(f"round {r + 1}: " + ", ".join(f"{n} {np.median(v):.2f} s" for n, v in times.items()), flush=True)
    for name, v in times.items():
        s = float(np.median(v))
        print(f"{name:>12}: median {s:.2f} s/step ({min(v):.2f}–{max(v):.2f}, n={len(v)}), "
              f"{tokens / s:,.0f} tokens/s, MFU {100 * flops_per_step / s / peak:.1f}%")
    if "transformers" in times:
        print(f"jaxgpt / transformers tokens/s: {np.median(times['transformers']) / np.median(times['jaxgpt']):.2f}×")


if __name__ == "__main__":
    main()

"""Everything a GPU shows, in one call that finishes in under 8 minutes: GPT-2 124M training
in bfloat16 (largest batch that fits, with and without remat, cuDNN against XLA attention;
tokens/s and MFU against the table peak), bfloat16 against float32 losses over 20 steps,
and decoding at batch 1 and 64 against the HBM roofline, beside transformers on the same
weights where torch has CUDA.

    python bench/gpu.py            # on the GPU machine
    python bench/gpu.py --tiny     # the same script at tiny shapes, e.g. on a CPU, to prove it runs

Random weights throughout (speed does not depend on them); prints as it goes.
"""

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt import config, flops, hf, model, optim, sharding, step
from jaxgpt.generate import generate

# HBM bandwidth per chip, bytes/s (the decode roofline's denominator); first match wins.
HBM = [("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H200", 4.8e12), ("A100", 2.0e12)]


def train_config(args, batch: int, remat: str, dtype: str) -> config.Config:
    m = (config.GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512) if args.tiny
         else config.GPTConfig(block_size=args.seq))
    return config.Config(model=m, data=config.DataConfig(batch_size=batch),
                         optim=config.OptimConfig(warmup_iters=0),
                         train=config.TrainConfig(compute_dtype=dtype, remat=remat))


def compiled_step(cfg: config.Config, attention: str):
    """(jitted step, its compiled executable, shardings) with cuDNN attention where it builds, or XLA's."""
    chosen = model.attention_implementation
    if attention == "xla":
        model.attention_implementation = lambda q: None  # read while tracing
    try:
        opt = optim.make_optimizer(cfg.optim)
        sh = step.shardings(cfg, opt, sharding.make_mesh(cfg.mesh))
        train_step = step.make_train_step(cfg, opt, sh)
        x = jax.ShapeDtypeStruct((1, cfg.data.batch_size, cfg.model.block_size), jnp.int32, sharding=sh["batch"])
        abstract = model.abstract_params(cfg.model)
        compiled = train_step.lower(abstract, jax.eval_shape(opt.init, abstract), x, x, 0).compile()
    finally:
        model.attention_implementation = chosen
    return train_step, compiled, opt, sh


def fits(compiled, limit: int | None) -> bool:
    if limit is None:
        return True
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes < 0.92 * limit


def run_steps(cfg, train_step, opt, sh, steps: int) -> tuple[float, list[float]]:
    """(median seconds per step, the losses) of `steps` steps on fixed random batches."""
    params = jax.jit(model.init_params, static_argnums=0, out_shardings=sh["params"])(cfg.model, jax.random.key(0))
    opt_state = jax.jit(opt.init, out_shardings=sh["opt_state"])(params)
    rng = np.random.default_rng(0)
    shape = (1, cfg.data.batch_size, cfg.model.block_size)
    batches = [jax.device_put(rng.integers(0, cfg.model.vocab_size, shape).astype(np.int32), sh["batch"])
               for _ in range(4)]
    times, losses = [], []
    for i in range(steps + 2):  # two warm-up steps
        t = time.perf_counter()
        params, opt_state, loss, _ = train_step(params, opt_state, batches[i % 4], batches[(i + 1) % 4], i)
        losses.append(float(loss))
        times.append(time.perf_counter() - t)
    return float(np.median(times[2:])), losses[2:]


def training(args, limit: int | None, peak: float) -> None:
    print("== training, bfloat16 compute", flush=True)
    q = jnp.zeros((1, 8, 12, 64), jnp.bfloat16)
    print(f"attention for bf16 [B, T, 12, 64]: {model.attention_implementation(q) or 'xla'}", flush=True)
    candidates = [8, 4] if args.tiny else [64, 48, 32, 24, 16, 8]
    for remat in ("none", "block"):
        for attention in ("cudnn", "xla"):
            for batch in candidates:
                cfg = train_config(args, batch, remat, "bfloat16")
                train_step, compiled, opt, sh = compiled_step(cfg, attention)
                if fits(compiled, limit):
                    break
            s, _ = run_steps(cfg, train_step, opt, sh, args.steps)
            tokens = batch * cfg.model.block_size
            mfu = model.flops_per_token(cfg.model) * tokens / s / peak
            print(f"remat {remat:5s} attention {attention:5s}: batch {batch} × {cfg.model.block_size}, "
                  f"{1000 * s:.1f} ms/step, {tokens / s:,.0f} tokens/s, MFU {100 * mfu:.1f}%", flush=True)


def precision(args) -> None:
    print("== bfloat16 against float32, same init and batches, 20 steps", flush=True)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = train_config(args, 4 if args.tiny else 8, "none", dtype)
        train_step, _, opt, sh = compiled_step(cfg, "cudnn")
        _, losses[dtype] = run_steps(cfg, train_step, opt, sh, 20)
    diff = max(abs(a - b) for a, b in zip(losses["float32"], losses["bfloat16"]))
    print(f"max |loss bf16 - loss fp32| over 20 steps: {diff:.4f} (bar 1e-2: {'met' if diff <= 1e-2 else 'NOT met'}); "
          f"last {losses['float32'][-1]:.4f} / {losses['bfloat16'][-1]:.4f}", flush=True)


def decoding(args) -> None:
    n_new = 32 if args.tiny else 256
    print(f"== decoding, bfloat16 params and cache, 16-token prompts, {n_new} new tokens", flush=True)
    cfg = train_config(args, 1, "none", "bfloat16").model
    params32 = model.init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params32)
    kind = jax.devices()[0].device_kind
    bandwidth = next((b for name, b in HBM if name in kind), None)
    param_bytes = sum(p.size * 2 for p in jax.tree.leaves(params))
    for batch in (1, 64):
        prompts = [[(7 * i + j) % cfg.vocab_size for j in range(16)] for i in range(batch)]
        generate(params, cfg, prompts, max_new_tokens=n_new, temperature=0)  # compile
        t = time.perf_counter()
        generate(params, cfg, prompts, max_new_tokens=n_new, temperature=0)
        s = time.perf_counter() - t
        line = f"batch {batch:2d}: {batch * n_new / s:,.0f} tokens/s ({1000 * s / n_new:.2f} ms a step)"
        if bandwidth:
            # each step reads every weight once and the cache so far (about half of it on average)
            kv_bytes = 2 * cfg.n_layer * batch * (16 + n_new / 2) * cfg.n_embd * 2
            roofline = bandwidth / (param_bytes + kv_bytes)
            line += f"; HBM roofline {roofline:,.0f} steps/s, reached {100 * n_new / s / roofline:.0f}%"
        print(line, flush=True)
    transformers_decoding(cfg, params32, n_new)


def transformers_decoding(cfg, params32, n_new: int) -> None:
    try:
        import torch
        import transformers
    except ImportError:
        print("transformers: torch or transformers not installed; skipped", flush=True)
        return
    if not torch.cuda.is_available():
        print("transformers: torch has no CUDA here; skipped", flush=True)
        return
    with tempfile.TemporaryDirectory() as d:
        hf.save_hf(cfg, params32, d)
        net = transformers.GPT2LMHeadModel.from_pretrained(d, torch_dtype=torch.bfloat16).cuda().eval()
    for batch in (1, 64):
        x = torch.tensor([[(7 * i + j) % cfg.vocab_size for j in range(16)] for i in range(batch)]).cuda()
        kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)
        net.generate(x, **kw)
        torch.cuda.synchronize()
        t = time.perf_counter()
        net.generate(x, **kw)
        torch.cuda.synchronize()
        s = time.perf_counter() - t
        print(f"transformers batch {batch:2d}: {batch * n_new / s:,.0f} tokens/s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes: proves the script runs (e.g. on a CPU)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per variant")
    args = ap.parse_args()

    t0 = time.perf_counter()
    dev = jax.devices()[0]
    limit = (dev.memory_stats() or {}).get("bytes_limit") if dev.platform == "gpu" else None
    peak = flops.peak_flops(jax.devices()[:1], jnp.bfloat16)
    print(f"{dev.device_kind}, jax {jax.__version__}, peak {peak / 1e12:.1f} TFLOP/s bf16 "
          f"({'table' if flops.table_peak(dev.device_kind, jnp.bfloat16) else 'measured matmul'}), "
          f"memory {f'{limit / 2**30:.0f} GiB' if limit else 'not reported'}", flush=True)
    training(args, limit, peak)
    precision(args)
    decoding(args)
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

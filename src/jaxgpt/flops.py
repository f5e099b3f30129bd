"""The chips jaxgpt knows (memory, peak FLOP/s, memory bandwidth) and the peak FLOP/s of the
devices a run uses, the denominator of MFU (model FLOPs utilisation: model.flops_per_token ×
tokens/s ÷ peak). `jaxgpt plan` reads the same table for its memory verdict and roofline."""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    kind: str  # a substring of jax's device_kind
    hbm: int  # bytes of device memory a program may use
    bf16: float  # dense peak FLOP/s in bfloat16
    f32: float  # and in float32 as XLA runs it by default: TF32 on GPUs, bfloat16 passes on TPUs
    bandwidth: float  # memory bytes/s


# Vendors' spec sheets. HBM: for TPUs, what XLA's TPU compiler reports available (16, 95 and
# 32 GiB nominal); for the H100, the size in XLA's target spec (what CUDA reports). The first
# match wins.
CHIPS = [
    Chip("H100 PCIe", 80 * GiB, 756e12, 378e12, 2.0e12),
    Chip("H100", 84_942_979_072, 989e12, 495e12, 3.35e12),
    Chip("H200", 141 * 10**9, 989e12, 495e12, 4.8e12),
    Chip("A100-SXM4-40GB", 40 * GiB, 312e12, 156e12, 1.555e12),
    Chip("A100-PCIE-40GB", 40 * GiB, 312e12, 156e12, 1.555e12),
    Chip("A100", 80 * GiB, 312e12, 156e12, 2.039e12),
    Chip("TPU v6 lite", int(31.25 * GiB), 918e12, 918e12, 1.64e12),
    Chip("TPU v5 lite", int(15.75 * GiB), 197e12, 197e12, 0.819e12),
    Chip("TPU v5", int(95.74 * GiB), 459e12, 459e12, 2.765e12),
    Chip("TPU v4", 32 * GiB, 275e12, 275e12, 1.2e12),
]


def chip(device_kind: str) -> Chip | None:
    return next((c for c in CHIPS if c.kind in device_kind), None)


def table_peak(device_kind: str, dtype) -> float | None:
    c = chip(device_kind)
    if c is None:
        return None
    return c.bf16 if jnp.dtype(dtype) == jnp.bfloat16 else c.f32


@functools.cache
def measured_peak(dtype=jnp.float32, n: int = 1024) -> float:
    """FLOP/s of a large matmul on this process's default device, best of a few runs."""
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    best = min(_timed(matmul, a) for _ in range(5))
    return 2 * n**3 / best


def _timed(f, a) -> float:
    t = time.perf_counter()
    f(a).block_until_ready()
    return time.perf_counter() - t


def peak_flops(devices: list, dtype) -> float:
    """Peak FLOP/s of `devices` from the table; where a kind is unknown (CPUs), a measured
    matmul per process, since a process's CPU devices share its cores."""
    per_device = [table_peak(d.device_kind, dtype) for d in devices]
    if all(p is not None for p in per_device):
        return sum(per_device)
    return measured_peak(jnp.dtype(dtype).type) * len({d.process_index for d in devices})

"""Peak FLOP/s of the devices a run uses, the denominator of MFU (model FLOPs utilisation:
model.flops_per_token × tokens/s ÷ peak)."""

import functools
import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per chip: (device_kind substring, bfloat16, float32 as XLA runs it by
# default: TF32 on GPUs, bfloat16 passes on TPUs). The first match wins.
PEAKS = [
    ("H100 PCIe", 756e12, 378e12),
    ("H100", 989e12, 495e12),
    ("H200", 989e12, 495e12),
    ("A100", 312e12, 156e12),
    ("TPU v6 lite", 918e12, 918e12),
    ("TPU v5 lite", 197e12, 197e12),
    ("TPU v5", 459e12, 459e12),
    ("TPU v4", 275e12, 275e12),
]


def table_peak(device_kind: str, dtype) -> float | None:
    for name, bf16, f32 in PEAKS:
        if name in device_kind:
            return bf16 if jnp.dtype(dtype) == jnp.bfloat16 else f32
    return None


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

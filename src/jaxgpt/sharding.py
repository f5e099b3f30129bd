"""The device mesh and how params, optimizer state and batches are laid out on it.

Three mesh axes: `data` splits the batch and replicates params; `fsdp` splits the batch
and shards params, grads and optimizer state along a large dim (gathered by XLA where a
layer needs them); `tensor` splits attention heads and the MLP hidden units as Megatron
does. The train step is jitted with these shardings and XLA inserts the collectives.
Several hosts run one process each, joined by `jax.distributed.initialize` (distributed.py).
"""

import math
import os

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the axes a batch's rows are split over

# Param path (dict keys joined by "/", layer index left out) -> the mesh axis of each dim.
# Kernels are [in, out]: c_attn and c_fc split their outputs over `tensor` (column
# parallel), the projections after them split their inputs (row parallel), so each
# block needs one reduction over `tensor` after attention and one after the MLP. GPT-2's
# fused c_attn columns are [q | k | v], so a device's contiguous slice of them is not
# whole heads: XLA exchanges one [N, D] slice of the activations per layer (a
# collective-permute, seen in the HLO at tensor=2) to hand each device its heads. The
# embedding splits its vocabulary over `tensor`. Paths not listed are replicated.
RULES = {
    "wte": ("tensor", "fsdp"),
    "wpe": (None, "fsdp"),
    "lm_head": ("tensor", "fsdp"),
    "h/attn/c_attn/kernel": ("fsdp", "tensor"),
    "h/attn/c_attn/bias": ("tensor",),
    "h/attn/c_proj/kernel": ("tensor", "fsdp"),
    "h/mlp/c_fc/kernel": ("fsdp", "tensor"),
    "h/mlp/c_fc/bias": ("tensor",),
    "h/mlp/c_gate/kernel": ("fsdp", "tensor"),
    "h/mlp/c_gate/bias": ("tensor",),
    "h/mlp/c_proj/kernel": ("tensor", "fsdp"),
}


def request_cpu_devices(mc: MeshConfig, batch_size: int, log) -> None:
    """Asks JAX for `mc.cpu_devices` CPU devices (see MeshConfig). It can only before JAX
    has started its backends: after that the devices stay as they are, with a note."""
    if mc.cpu_devices == 1 or "JAX_NUM_CPU_DEVICES" in os.environ \
            or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    cores = len(os.sched_getaffinity(0))
    n = mc.cpu_devices or max(d for d in range(1, cores + 1) if batch_size % d == 0)
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backends have started
        if jax.default_backend() == "cpu" and jax.device_count() != n:
            log(f"mesh.cpu_devices: JAX has already started with {jax.device_count()} CPU devices; training on those")


def mesh_shape(mc: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with a -1 filled so that the product is `n_devices`."""
    sizes = (mc.data, mc.fsdp, mc.tensor)
    named = ", ".join(f"{a}={s}" for a, s in zip(AXES, sizes))
    if sizes.count(-1) > 1 or any(s < 1 and s != -1 for s in sizes):
        raise ConfigError(f"mesh {named}: sizes must be positive, with at most one -1 (fill)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"mesh {named}: {n_devices} devices are not divisible by {known}; "
                              f"make the fixed sizes divide {n_devices}")
        sizes = tuple(n_devices // known if s == -1 else s for s in sizes)
    elif known != n_devices:
        raise ConfigError(f"mesh {named} needs {known} devices but there are {n_devices}: "
                          "make data × fsdp × tensor equal the device count, or set one of them to -1")
    return sizes


def make_mesh(mc: MeshConfig, devices: list | None = None) -> Mesh:
    """The mesh of `mc` over `devices` (default: every device of the job; `jaxgpt plan` passes
    compile-only ones). Auto axes: shardings are handed to jit and XLA propagates them."""
    devices = jax.devices() if devices is None else devices
    return jax.make_mesh(mesh_shape(mc, len(devices)), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _path_key(path) -> str:
    return "/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _spec(mesh: Mesh, axes: tuple, shape: tuple[int, ...]) -> P:
    """`axes` for `shape`, leaving a dim unsplit where its mesh axis does not divide it."""
    return P(*(a if a is not None and dim % mesh.shape[a] == 0 else None for a, dim in zip(axes, shape)))


def param_shardings(mesh: Mesh, params):
    """NamedShardings for a param tree (arrays or ShapeDtypeStructs), by RULES."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, _spec(mesh, RULES.get(_path_key(path), ()), x.shape)), params)


def opt_state_shardings(mesh: Mesh, opt: optax.GradientTransformation, params_sharding, abstract_params):
    """Each moment takes the sharding of the param it tracks; counters are replicated. Under
    optax.partition (Muon) a transform's state holds MaskedNode where another tracks the param."""
    abstract_state = jax.eval_shape(opt.init, abstract_params)
    replicated = NamedSharding(mesh, P())
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return optax.tree_map_params(opt, lambda x, s: x if masked(x) else s, abstract_state, params_sharding,
                                 transform_non_params=lambda _: replicated, is_leaf=masked)


def batch_sharding(mesh: Mesh, ndim: int = 2, axis: int = 0) -> NamedSharding:
    """Rows (dim `axis` of an `ndim`-D batch) split over data × fsdp."""
    return NamedSharding(mesh, P(*(BATCH if i == axis else None for i in range(ndim))))


def with_shardings(abstract, shardings):
    """ShapeDtypeStructs carrying shardings: what orbax restores onto."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def check_batch(mesh: Mesh, batch_size: int) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        raise ConfigError(f"data.batch_size {batch_size} must be divisible by mesh data × fsdp = {n}: "
                          f"use a multiple of {n}, or move devices to the tensor axis")


def process_rows(sharding: NamedSharding, shape: tuple[int, ...], axis: int = 0) -> slice:
    """The rows (along `axis`) of a global batch that this process's devices hold."""
    indices = sharding.addressable_devices_indices_map(shape).values()
    spans = sorted({(i[axis].start or 0, shape[axis] if i[axis].stop is None else i[axis].stop) for i in indices})
    if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
        raise ConfigError("this process's devices hold non-contiguous batch rows: order the mesh so that "
                          "each host's devices are adjacent along data × fsdp")
    lo, hi = spans[0][0], spans[-1][1]
    return slice(lo, hi)


def global_batch(sharding: NamedSharding, local: np.ndarray, shape: tuple[int, ...]) -> jax.Array:
    """The global array of a batch from this process's rows of it."""
    return jax.make_array_from_process_local_data(sharding, local, shape)

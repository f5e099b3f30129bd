"""Plan a run on hardware you do not have: compile the very train step `jaxgpt train` runs for
a TPU slice or a GPU node, on abstract inputs (nothing is allocated, no data is read), and
read XLA's answer: memory per device, FLOPs and bytes per step, the collectives it inserted.

TPU targets need libtpu (pip install 'jaxgpt[tpu]'): it compiles for any TPU topology on a
CPU-only machine (`jax.experimental.topologies`). GPU targets need the CUDA plugin without
CUDA itself (pip install 'jax[cuda12-local]' at jax's version) and a description of the GPU
(XLA's GpuTargetConfig, cut down below).
"""

import contextlib
import dataclasses
import math
import os
import re

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxgpt import flops, model, optim, sharding, step
from jaxgpt.config import Config
from jaxgpt.errors import UserError


class PlanError(UserError):
    """A target jaxgpt cannot compile for here (unknown name, missing plugin)."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as the user wrote it
    platform: str  # "tpu" or "cuda"
    topology: str  # what get_topology_desc takes
    chips: int


# Cloud names: v5e-N and v6e-N count chips (Google also calls v5e "v5litepod"), v5p-N counts
# TensorCores, two a chip. libtpu's topology names: v5e:AxB, v6e:AxB, v5p:AxBxC.
TPU_FAMILIES = {"v5e": (2, 1), "v5litepod": (2, 1), "v6e": (2, 1), "v5p": (3, 2)}  # name: (dims, cores a chip)
GPUS = {"h100": "NVIDIA H100 80GB HBM3"}
FORMS = "v5e-8, v5p-64, v6e-256, v5e:2x4, v5p:2x2x2 or 8xh100"


def parse_target(name: str) -> Target:
    """A topology as cloud users write it (v5e-8, v5p-64, v6e-256), in libtpu's form
    (v5e:2x4, v5p:2x4x4), or N GPUs (8xh100)."""
    n = name.strip().lower()
    if m := re.fullmatch(r"(\d+)x([a-z0-9]+)", n):
        count, gpu = int(m[1]), m[2]
        if gpu not in GPUS:
            raise PlanError(f"--topology {name}: unknown GPU '{gpu}'; known: {', '.join(GPUS)}")
        if count < 1 or (count > 8 and count % 8):
            raise PlanError(f"--topology {name}: give up to 8 GPUs, or a multiple of 8 (nodes of 8)")
        return Target(name, "cuda", f"1x{max(count // 8, 1)}x{min(count, 8)}", count)
    if m := re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", n):
        family, dims = m[1], [int(d) for d in m[2].split("x")]
        if family not in TPU_FAMILIES or len(dims) != TPU_FAMILIES[family][0] or min(dims) < 1:
            raise PlanError(f"--topology {name}: not a TPU topology jaxgpt knows; give one like {FORMS}")
        return Target(name, "tpu", f"{_libtpu_family(family)}:{m[2]}", math.prod(dims))
    if m := re.fullmatch(r"([a-z0-9]+)-(\d+)", n):
        family, count = m[1], int(m[2])
        if family in TPU_FAMILIES:
            ndim, cores = TPU_FAMILIES[family]
            chips = count // cores
            if count % cores or chips & (chips - 1) or (chips < 4 and not (ndim == 2 and chips == 1)):
                raise PlanError(f"--topology {name}: {family} slices come in powers of two "
                                f"({'1, 4, 8, ...' if ndim == 2 else '8, 16, 32, ... TensorCores'})")
            return Target(name, "tpu", f"{_libtpu_family(family)}:{'x'.join(map(str, _slice_shape(chips, ndim)))}",
                          chips)
    raise PlanError(f"--topology {name}: unknown topology; give one like {FORMS}")


def _libtpu_family(family: str) -> str:
    return "v5e" if family == "v5litepod" else family


def _slice_shape(chips: int, ndim: int) -> list[int]:
    """The chip grid of a slice of `chips` chips, as Cloud TPU builds them: 2x2(x1), then the
    last of the smallest dims doubles (2x4, 4x4, 4x8, ...; 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...)."""
    if chips == 1:
        return [1] * ndim
    shape = [2, 2] + [1] * (ndim - 2)
    while math.prod(shape) < chips:
        i = max(j for j, d in enumerate(shape) if d == min(shape))
        shape[i] *= 2
    return shape


def _h100_spec() -> str:
    """The H100 SXM's GpuTargetConfig in text form: the fields jaxlib 0.10 parses, with the
    values of XLA's published spec (xla/backends/gpu/target_config/specs/h100_sxm.txtpb)."""
    info = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
                shared_memory_per_block_optin=232448, shared_memory_per_core=233472, threads_per_core_limit=2048,
                core_count=132, fpus_per_core=128, block_dim_limit_x=2147483647, block_dim_limit_y=65535,
                block_dim_limit_z=65535, memory_bandwidth=3352320000000, l2_cache_size=52428800,
                clock_rate_ghz=1.98, device_memory_size=84942979072, registers_per_core_limit=65536,
                registers_per_block_limit=65536)
    fields = " ".join(f"{k}: {v}" for k, v in info.items())
    return (f"gpu_device_info {{ {fields} cuda_compute_capability {{ major: 9 }} }} platform_name: \"CUDA\" "
            f"dnn_version_info {{ major: 9 minor: 8 }} device_description_str: \"{GPUS['h100']}\"")


def devices(target: Target) -> list:
    """Compile-only devices of `target`: nothing runs on them, programs compile for them."""
    from jax.experimental import topologies

    if target.platform == "tpu":
        # Without these libtpu looks for the TPU VM it runs on, warns that it finds none, and
        # holds a lock that stops a second process from compiling at the same time.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        one_chip = {"chips_per_host_bounds": (1, 1, 1)} if target.chips == 1 else {}  # the default host is 2x2x1
        try:
            topology = topologies.get_topology_desc(platform="tpu", topology_name=target.topology, **one_chip)
        except RuntimeError as e:
            if "TPU support not installed" in str(e):
                raise PlanError(f"--topology {target.name} needs libtpu: pip install 'jaxgpt[tpu]'") from None
            if "INVALID_ARGUMENT" in str(e):
                raise PlanError(f"--topology {target.name}: libtpu rejects {target.topology}: "
                                f"{str(e).splitlines()[0]}") from None
            raise
    else:
        try:
            topology = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                                    target_config=_h100_spec())
        except NotImplementedError:  # no CUDA plugin registered
            raise PlanError(f"--topology {target.name} needs JAX's CUDA plugin (no GPU or CUDA needed): "
                            f"pip install 'jax[cuda12-local]=={jax.__version__}'") from None
    return list(topology.devices)


def block_length(cfg: Config) -> int:
    """Steps in train's usual compiled call: steps_per_call, cut by evaluations and the end."""
    tc = cfg.train
    return max(1, min(tc.steps_per_call, tc.eval_interval, tc.max_iters))


def compile_train_steps(cfg: Config, mesh: Mesh):
    """`step.make_train_steps` (what train runs) lowered on abstract sharded inputs and compiled
    for `mesh`'s devices; returns (compiled, params, opt_state), the last two ShapeDtypeStructs."""
    sharding.check_batch(mesh, cfg.data.batch_size)
    opt = optim.make_optimizer(cfg.optim)
    sh = step.shardings(cfg, opt, mesh)
    abstract = model.abstract_params(cfg.model)
    params = sharding.with_shardings(abstract, sh["params"])
    opt_state = sharding.with_shardings(jax.eval_shape(opt.init, abstract), sh["opt_state"])
    x = jax.ShapeDtypeStruct((block_length(cfg), cfg.train.grad_accum, cfg.data.batch_size, cfg.model.block_size),
                             jnp.int32, sharding=sh["batches"])
    return step.make_train_steps(cfg, opt, sh).lower(params, opt_state, x, x, 0).compile(), params, opt_state


def device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree))


def memory(cfg: Config, mesh: Mesh) -> dict[str, int]:
    """Bytes per device of train's compiled step on `mesh`: params and optimizer state (their
    shards), activations and temporaries (XLA's), other (the batches, outputs not written in
    place, the program) and the total. Raises XLA's error where the program does not fit."""
    compiled, params, opt_state = compile_train_steps(cfg, mesh)
    return _memory(compiled, params, opt_state)


def _memory(compiled, params, opt_state) -> dict[str, int]:
    m = compiled.memory_analysis()
    b = {"params": device_bytes(params), "opt_state": device_bytes(opt_state), "activations": m.temp_size_in_bytes}
    total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
             + m.generated_code_size_in_bytes)
    return b | {"other": total - sum(b.values()), "total": total}


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_OOM = [re.compile(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"),
        re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm")]


def out_of_memory(e: Exception) -> dict | None:
    """XLA's out-of-memory compile error as {needed, available, message} (bytes per device;
    needed may count temporaries only, a lower bound); None for any other error."""
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
        return None
    first = next((line for line in msg.splitlines() if line.strip()), msg).strip()
    for pattern in _OOM:
        if m := pattern.search(msg):
            return {"needed": float(m[1]) * _UNITS[m[2]], "available": float(m[3]) * _UNITS[m[4]], "message": first}
    return {"needed": None, "available": None, "message": first}


def _cost(compiled) -> tuple[float, float] | None:
    """(FLOPs, bytes accessed) per device of a compiled program; None where XLA gives none (GPU).
    XLA counts a loop's body once, whatever its trip count."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list) else ca
    if not ca or "flops" not in ca:
        return None
    return ca["flops"], ca.get("bytes accessed", 0.0)


def step_cost(cfg: Config, mesh: Mesh, compiled) -> tuple[float, float] | None:
    """(FLOPs, bytes accessed) per device of one training step. XLA counts the body of the
    block's loop once, so `compiled` gives one step when it has one micro-batch; with grad_accum
    A the micro-batch loop is counted once too, so: A × (a one-micro-batch step − the optimizer
    update) + the update, from two more compiles."""
    A = cfg.train.grad_accum
    if A == 1:
        return _cost(compiled)
    one = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=1))
    c1, c_opt = _cost(compile_train_steps(one, mesh)[0]), _cost(_compile_update(cfg, mesh))
    if c1 is None or c_opt is None:
        return None
    return tuple(A * (a - b) + b for a, b in zip(c1, c_opt))


def _compile_update(cfg: Config, mesh: Mesh):
    """The optimizer's update of the params (train's, with its shardings), compiled alone."""
    opt = optim.make_optimizer(cfg.optim)
    sh = step.shardings(cfg, opt, mesh)
    abstract = model.abstract_params(cfg.model)

    def update(params, opt_state, grads):
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = sharding.with_shardings(abstract, sh["params"])
    opt_state = sharding.with_shardings(jax.eval_shape(opt.init, abstract), sh["opt_state"])
    return jax.jit(update, donate_argnums=(0, 1)).lower(params, opt_state, params).compile()


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.-]+) [(]")
_OP = re.compile(r"^\s*(?:ROOT )?%[\w.-]+ = (.*?) (all-gather|reduce-scatter|all-reduce|collective-permute|all-to-all)"
                 r"(-start)?\(")
_FUSED_REDUCE_SCATTER = re.compile(r"^\s*(?:ROOT )?%[\w.-]+ = (.*?) fusion\(.*calls=%all-reduce-scatter")


def collectives(hlo: str, grad_accum: int, steps: int) -> dict[str, dict]:
    """Count and result bytes per device of each kind of collective in one training step of
    a compiled block's HLO text. An op inside the micro-batch loop (two scans deep in its
    op_name) runs grad_accum times a step; one outside the block's loop, once a block of
    `steps`. XLA:TPU writes a reduce-scatter as a fusion around an all-reduce (counted once)."""
    out = {k: {"count": 0.0, "bytes": 0.0} for k in COLLECTIVES}
    computation = ""
    for line in hlo.splitlines():
        if m := _COMPUTATION.match(line):
            computation = m[1]
            continue
        if computation.startswith("all-reduce-scatter"):
            continue
        if m := _FUSED_REDUCE_SCATTER.match(line):
            kind, shape, start = "reduce-scatter", m[1], None
        elif m := _OP.match(line):
            kind, shape, start = m[2], m[1], m[3]
        else:
            continue
        arrays = _ARRAY.findall(shape)
        if start and kind != "all-reduce":  # an async start's tuple holds its operands, then its results
            arrays = arrays[len(arrays) // 2:]
        nbytes = sum(_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in arrays)
        depth = line.count("while/body")
        weight = 1 / steps if depth == 0 else grad_accum if depth >= 2 else 1
        out[kind]["count"] += weight
        out[kind]["bytes"] += weight * nbytes
    return out


@contextlib.contextmanager
def _no_persistent_cache():
    """Keeps compiles for compile-only devices out of XLA's persistent cache: it cannot load
    them back (a warning on every later run) and they would only fill it."""
    from jax.experimental.compilation_cache import compilation_cache

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # else the cache's first verdict (in use) sticks
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        compilation_cache.reset_cache()


def _setting(cfg: Config, topology: str) -> tuple[Target, list, Mesh]:
    """The target, its devices and `cfg`'s mesh over them."""
    target = parse_target(topology)
    sharding.mesh_shape(cfg.mesh, target.chips)  # a mesh that does not fit the chips says so before libtpu loads
    devs = devices(target)
    return target, devs, sharding.make_mesh(cfg.mesh, devs)


@_no_persistent_cache()
def plan(cfg: Config, topology: str) -> dict:
    """Compiles train's step for `topology` and returns what XLA says about it: per-device
    memory (or its out-of-memory error), the chip, FLOPs and bytes per step, a roofline step
    time and the collectives. `cfg` as given to train (compute_dtype auto means bfloat16)."""
    target, devs, mesh = _setting(cfg, topology)
    kind = devs[0].device_kind
    chip = flops.chip(kind)
    tokens = cfg.train.grad_accum * cfg.data.batch_size * cfg.model.block_size
    out = {"target": target, "device_kind": kind, "chip": chip, "mesh": dict(mesh.shape), "tokens_per_step": tokens,
           "model_flops": model.flops_per_token(cfg.model) * tokens, "memory": None, "oom": None}
    try:
        compiled, params, opt_state = compile_train_steps(cfg, mesh)
    except Exception as e:
        if (oom := out_of_memory(e)) is None:
            raise
        return out | {"oom": oom}
    out["memory"] = _memory(compiled, params, opt_state)
    out["collectives"] = collectives(compiled.as_text(), cfg.train.grad_accum, block_length(cfg))
    out["cost"] = step_cost(cfg, mesh, compiled)
    out["roofline"] = roofline(out, step.compute_dtype(cfg.train.compute_dtype, mesh))
    return out


def roofline(p: dict, dtype) -> dict | None:
    """The step time the chip allows: the larger of FLOPs ÷ peak and bytes ÷ memory bandwidth
    (per device, XLA's counts; without them, the model's FLOPs and no memory term), the tokens/s
    it gives and the MFU ceiling it implies."""
    chip = p["chip"]
    if chip is None:
        return None
    peak = chip.bf16 if jnp.dtype(dtype) == jnp.bfloat16 else chip.f32
    n = p["target"].chips
    flops_dev, bytes_dev = p["cost"] or (p["model_flops"] / n, None)
    t_flops, t_bytes = flops_dev / peak, None if bytes_dev is None else bytes_dev / chip.bandwidth
    t = max(t_flops, t_bytes or 0.0)
    return {"peak": peak, "t_flops": t_flops, "t_bytes": t_bytes, "step_s": t, "tokens_per_s": p["tokens_per_step"] / t,
            "mfu": p["model_flops"] / (t * n * peak)}


def verdict(p: dict) -> str:
    """One line: fits with X GiB to spare / does not fit by X GiB."""
    hbm = p["chip"].hbm if p["chip"] else None
    if p["oom"] is not None:
        oom = p["oom"]
        if oom["needed"] is None:
            return f"does not fit: XLA says {oom['message']}"
        return (f"does not fit by at least {(oom['needed'] - oom['available']) / 2**30:.2f} GiB: XLA's compile needs "
                f"{oom['needed'] / 2**30:.2f} GiB for temporaries alone of the {oom['available'] / 2**30:.2f} GiB "
                "a device has")
    total = p["memory"]["total"]
    if hbm is None:
        return f"needs {total / 2**30:.2f} GiB a device ({p['device_kind']}: memory size unknown to jaxgpt)"
    if total > hbm:
        return f"does not fit by {(total - hbm) / 2**30:.2f} GiB: needs {total / 2**30:.2f} of {hbm / 2**30:.2f} GiB a device"
    return f"fits with {(hbm - total) / 2**30:.2f} GiB to spare: {total / 2**30:.2f} of {hbm / 2**30:.2f} GiB a device"


@_no_persistent_cache()
def max_batch(cfg: Config, topology: str, limit: int = 1 << 14) -> int:
    """The largest data.batch_size (a multiple of the mesh's data × fsdp) whose train step fits
    the target's memory; 0 when one row a device does not. Memory grows about linearly with
    the rows, so two compiles (1 and 2 rows a device) give a guess, and compiles around it
    confirm it (bisection where XLA's compiler, which rematerialises near the limit, departs)."""
    _, devs, mesh = _setting(cfg, topology)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    hbm = (flops.chip(devs[0].device_kind) or flops.Chip("", 2**62, 0, 0, 0)).hbm
    totals = {}

    def ok(per_device: int) -> bool:
        c = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=per_device * rows))
        try:
            totals[per_device] = memory(c, mesh)["total"]
        except Exception as e:
            if out_of_memory(e) is None:
                raise
            totals[per_device] = math.inf
        return totals[per_device] <= hbm

    if not ok(1):
        return 0
    if not ok(2):
        return rows
    guess = min(limit, max(2, int((hbm - totals[1]) // max(totals[2] - totals[1], 1)) + 1))
    lo, hi = (guess, None) if ok(guess) else (2, guess)  # lo fits; hi, where known, does not
    step = 1
    while hi is None and lo + step <= limit:  # up from a guess that fits: +1, +2, +4, ...
        lo, hi, step = (lo + step, None, 2 * step) if ok(lo + step) else (lo, lo + step, step)
    if hi is None:
        return lo * rows
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo * rows

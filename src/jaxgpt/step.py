"""The compiled work of training: the jitted train and eval steps, their shardings, the
batches they read, and the loss estimates made from them.

Iteration `it` trains on batch (seed, it) with dropout key (seed, it), so a run resumed
from the checkpoint taken at `it` continues exactly as the uninterrupted run would have.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt import data, model, optim, sharding
from jaxgpt.config import Config, MeshConfig

EVAL_STREAM = 1 << 40  # eval batches draw from steps far past any training step


def compute_dtype(name: str, mesh: Mesh):
    """The matmul dtype of config.train.compute_dtype on `mesh`'s devices (this machine's, or
    the compile-only ones `jaxgpt plan` targets); auto is bfloat16 on accelerators."""
    if name == "auto":
        return jnp.float32 if mesh.devices.flat[0].platform == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def shardings(cfg: Config, opt: optax.GradientTransformation, mesh: Mesh) -> dict:
    """NamedShardings on `mesh` of params, optimizer state, [A, B, T] train batches, blocks
    [K, A, B, T] of them, [B, T] eval batches and scalars (and per-step [K] values)."""
    abstract = model.abstract_params(cfg.model)
    params = sharding.param_shardings(mesh, abstract)
    return {"params": params, "opt_state": sharding.opt_state_shardings(mesh, opt, params, abstract),
            "batch": sharding.batch_sharding(mesh, 3, axis=1), "batches": sharding.batch_sharding(mesh, 4, axis=2),
            "eval_batch": sharding.batch_sharding(mesh), "scalar": NamedSharding(mesh, P())}


def default_shardings(cfg: Config) -> dict:
    """`shardings` on the mesh of cfg.mesh over all devices, for steps made outside a run."""
    return shardings(cfg, optim.make_optimizer(cfg.optim), sharding.make_mesh(cfg.mesh))


StepStats = Callable[[dict, dict, dict], dict]  # (params, grads, updates) -> scalars, traced in the step


def _step(cfg: Config, opt: optax.GradientTransformation, step_stats: Sequence[StepStats], mesh: Mesh):
    """The training step, not jitted: see `make_train_step`."""
    mcfg, dtype, remat = cfg.model, compute_dtype(cfg.train.compute_dtype, mesh), cfg.train.remat == "block"
    base_key = jax.random.key(cfg.train.seed)

    def micro_loss(params, x_BT, y_BT, key):
        params = jax.tree.map(lambda p: p.astype(dtype), params)
        return model.loss_fn(params, x_BT, y_BT, mcfg, key if mcfg.dropout > 0 else None, remat=remat)

    def micro_grads(params, x_BT, y_BT, key):
        return jax.value_and_grad(micro_loss)(params, x_BT, y_BT, key)

    def step(params, opt_state, x_ABT, y_ABT, it):
        key = jax.random.fold_in(base_key, it)
        A = x_ABT.shape[0]
        if A == 1:
            loss, grads = micro_grads(params, x_ABT[0], y_ABT[0], key)
        else:
            def body(acc, i):
                loss_i, grads_i = micro_grads(params, x_ABT[i], y_ABT[i], jax.random.fold_in(key, i))
                return jax.tree.map(jnp.add, acc, (loss_i, grads_i)), None

            zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
            (loss, grads), _ = jax.lax.scan(body, zeros, jnp.arange(A))
            loss, grads = jax.tree.map(lambda g: g / A, (loss, grads))
        updates, opt_state = opt.update(grads, opt_state, params)
        stats = {"grad_norm": optax.tree.norm(grads)}
        for extra in step_stats:
            stats |= extra(params, grads, updates)
        return optax.apply_updates(params, updates), opt_state, loss, stats

    return step


def make_train_step(cfg: Config, opt: optax.GradientTransformation, sh: dict | None = None,
                    step_stats: Sequence[StepStats] = ()):
    """(params, opt_state, x_ABT, y_ABT, it) -> (params, opt_state, loss, stats); A micro-batches.

    `stats` holds the gradient's global norm and what each of `step_stats` computes from this
    very step's params, gradients and updates. Jitted with the shardings `sh` (default: those
    of cfg.mesh over all devices); the matmuls run in cfg.train.compute_dtype on a cast of
    the float32 params."""
    sh = sh or default_shardings(cfg)
    return jax.jit(_step(cfg, opt, step_stats, sh["scalar"].mesh),
                   in_shardings=(sh["params"], sh["opt_state"], sh["batch"], sh["batch"], sh["scalar"]),
                   out_shardings=(sh["params"], sh["opt_state"], sh["scalar"], sh["scalar"]), donate_argnums=(0, 1))


def make_train_steps(cfg: Config, opt: optax.GradientTransformation, sh: dict | None = None,
                     step_stats: Sequence[StepStats] = ()):
    """(params, opt_state, x_KABT, y_KABT, it) -> (params, opt_state, loss_K, stats_K): the
    steps of iterations it, ..., it + K - 1 in one call, a `lax.scan` of `make_train_step`'s
    step over a block of K batches, each step's loss and stats stacked. The same iterations
    as K single calls; XLA:CPU runs a block of 10 a quarter faster a step than 10 calls
    (bench/RESULTS.md). A block length compiles once."""
    sh = sh or default_shardings(cfg)
    step = _step(cfg, opt, step_stats, sh["scalar"].mesh)

    def steps(params, opt_state, x_KABT, y_KABT, it):
        def body(carry, xs):
            params, opt_state = carry
            x_ABT, y_ABT, i = xs
            params, opt_state, loss, stats = step(params, opt_state, x_ABT, y_ABT, i)
            return (params, opt_state), (loss, stats)

        its_K = it + jnp.arange(x_KABT.shape[0])
        (params, opt_state), (loss_K, stats_K) = jax.lax.scan(body, (params, opt_state), (x_KABT, y_KABT, its_K))
        return params, opt_state, loss_K, stats_K

    return jax.jit(steps, in_shardings=(sh["params"], sh["opt_state"], sh["batches"], sh["batches"], sh["scalar"]),
                   out_shardings=(sh["params"], sh["opt_state"], sh["scalar"], sh["scalar"]), donate_argnums=(0, 1))


def make_eval_step(cfg: Config, sh: dict | None = None):
    """(params, x_BT, y_BT, mask_BT) -> (summed loss, token count), for exact means over a split.

    Takes whole numpy batches (each process sends only its rows to its devices) or batches
    `place_eval_batch` already put there."""
    sh = sh or default_shardings(cfg)
    dtype, batch_sh = compute_dtype(cfg.train.compute_dtype, sh["scalar"].mesh), sh["eval_batch"]

    def step(params, x_BT, y_BT, mask_BT):
        n = mask_BT.sum()
        params = jax.tree.map(lambda p: p.astype(dtype), params)
        return model.loss_fn(params, x_BT, y_BT, cfg.model, mask_BT=mask_BT) * n, n

    jitted = jax.jit(step, in_shardings=(sh["params"], batch_sh, batch_sh, batch_sh), out_shardings=sh["scalar"])

    def eval_step(params, x_BT, y_BT, mask_BT):
        return jitted(params, *(place_eval_batch(batch_sh, a) for a in (x_BT, y_BT, mask_BT)))

    return eval_step


def place_eval_batch(batch_sh: NamedSharding, a_BT) -> jax.Array:
    """A whole numpy [B, T] batch as a global array, from this process's rows; placed ones pass."""
    if isinstance(a_BT, jax.Array):
        return a_BT
    return sharding.global_batch(batch_sh, a_BT[sharding.process_rows(batch_sh, a_BT.shape)], a_BT.shape)


def train_batch(ds: data.Dataset, cfg: Config, it: int, rows: slice = slice(None)):
    """The micro-batches of iteration `it` (only `rows` of each), stacked to [A, B, T]."""
    A, B, T = cfg.train.grad_accum, cfg.data.batch_size, cfg.model.block_size
    xs, ys = zip(*(data.get_batch(ds, "train", B, T, cfg.train.seed, it * A + a, rows) for a in range(A)))
    return np.stack(xs), np.stack(ys)


def global_train_batches(ds: data.Dataset, cfg: Config, it: int, steps: int, batches_sh: NamedSharding):
    """The batches of iterations it, ..., it + steps - 1 as global [K, A, B, T] arrays, from
    the rows this process's devices hold."""
    shape = (steps, cfg.train.grad_accum, cfg.data.batch_size, cfg.model.block_size)
    rows = sharding.process_rows(batches_sh, shape, axis=2)
    x, y = (np.stack(a) for a in zip(*(train_batch(ds, cfg, i, rows) for i in range(it, it + steps))))
    return sharding.global_batch(batches_sh, x, shape), sharding.global_batch(batches_sh, y, shape)


def estimate_batches(ds: data.Dataset, cfg: Config, sh: dict | None = None) -> dict[str, list]:
    """The `eval_iters` random (x, y, mask) batches of each split that every evaluation
    scores, placed on the devices once (`sh`: the run's shardings)."""
    B, T = cfg.data.batch_size, cfg.model.block_size
    batch_sh = (sh or default_shardings(cfg))["eval_batch"]
    rows = sharding.process_rows(batch_sh, (B, T))  # this process reads only its rows

    def place(a_bT):
        return sharding.global_batch(batch_sh, a_bT, (B, T))

    ones_BT = place(np.ones((rows.stop - rows.start, T), np.int32))
    return {split: [(*(place(a) for a in data.get_batch(ds, split, B, T, cfg.train.seed, EVAL_STREAM + i, rows)),
                     ones_BT) for i in range(cfg.train.eval_iters)]
            for split in ("train", "val")}


def estimate_loss(eval_step, params, batches: dict[str, list]) -> dict[str, float]:
    """Mean loss of each split over its `estimate_batches`."""
    out = {}
    for split, xym in batches.items():
        sums = jax.device_get([eval_step(params, x, y, m)[0] for x, y, m in xym])  # one host sync per split
        out[split] = float(sum(sums)) / sum(x.size for x, _, _ in xym)
    return out


def evaluate_split(params, ds: data.Dataset, cfg: Config, split: str = "val") -> dict[str, float]:
    """Exact mean loss over every token of a split (deterministic), and its perplexity, with
    the batch split over the devices at hand (whatever mesh the run was trained on)."""
    cfg = dataclasses.replace(cfg, mesh=MeshConfig())
    eval_step = make_eval_step(cfg)
    sums = [eval_step(params, x, y, m) for x, y, m in data.eval_batches(ds, split, cfg.data.batch_size,
                                                                         cfg.model.block_size)]
    sums = jax.device_get(sums)  # fetched once: no host sync per batch
    total, count = sum(float(s) for s, _ in sums), sum(int(n) for _, n in sums)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def describe(cfg: Config) -> dict:
    """Parameter count, FLOPs and the bytes one device holds for a training step under the
    config's mesh over this process's devices, from the compiled step (`plan.memory`, as
    `jaxgpt plan` reads it): nothing is allocated."""
    from jaxgpt import plan  # plan compiles this module's steps

    params = model.abstract_params(cfg.model)
    return {
        "params": model.count_params(params),
        "params_non_embedding": model.count_params(params, non_embedding=True),
        "flops_per_token": model.flops_per_token(cfg.model),
        "tokens_per_step": cfg.train.grad_accum * cfg.data.batch_size * cfg.model.block_size,
        "bytes": plan.memory(cfg, sharding.make_mesh(cfg.mesh)),
    }

"""The training loop: one jitted step, periodic evaluation, logging, checkpoints, resume.

Iteration `it` trains on batch (seed, it) with dropout key (seed, it), so a run resumed
from the checkpoint taken at `it` continues exactly as the uninterrupted run would have.
Params, optimizer state and batches are laid out on the device mesh of `[mesh]` (see
sharding.py); in a multi-host run each process loads only its rows of every batch.
"""

import contextlib
import dataclasses
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt import checkpoint, data, flops, model, optim, runlog, sharding
from jaxgpt import config as config_lib
from jaxgpt.config import Config, GPTConfig

EVAL_STREAM = 1 << 40  # eval batches draw from steps far past any training step


class TrainError(ValueError):
    """A run that cannot start as asked (e.g. resuming with no checkpoint)."""


def compute_dtype(name: str):
    """The matmul dtype of config.train.compute_dtype; auto is bfloat16 on accelerators."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def shardings(cfg: Config, opt: optax.GradientTransformation, mesh: Mesh) -> dict:
    """NamedShardings of params, optimizer state, [A, B, T] train batches and scalars on `mesh`."""
    abstract = model.abstract_params(cfg.model)
    params = sharding.param_shardings(mesh, abstract)
    return {"params": params, "opt_state": sharding.opt_state_shardings(mesh, opt, params, abstract),
            "batch": sharding.batch_sharding(mesh, 3, axis=1), "scalar": NamedSharding(mesh, P())}


def make_train_step(cfg: Config, opt: optax.GradientTransformation, mesh: Mesh | None = None):
    """(params, opt_state, x_ABT, y_ABT, it) -> (params, opt_state, loss, stats); A micro-batches.

    `stats` holds the gradient's global norm and, under cfg.train.layer_stats, each layer's
    param_norm, grad_norm and update_ratio (update norm / param norm) of this very step.
    Jitted with the shardings of `mesh` (default: cfg.mesh over all devices); the matmuls
    run in cfg.train.compute_dtype on a cast of the float32 params."""
    mcfg, dtype, remat = cfg.model, compute_dtype(cfg.train.compute_dtype), cfg.train.remat == "block"
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
        if cfg.train.layer_stats:
            stats |= _layer_stats(params, grads, updates)
        return optax.apply_updates(params, updates), opt_state, loss, stats

    sh = shardings(cfg, opt, mesh or sharding.make_mesh(cfg.mesh))
    return jax.jit(step, in_shardings=(sh["params"], sh["opt_state"], sh["batch"], sh["batch"], sh["scalar"]),
                   out_shardings=(sh["params"], sh["opt_state"], sh["scalar"], sh["scalar"]), donate_argnums=(0, 1))


def make_eval_step(cfg: Config, mesh: Mesh | None = None):
    """(params, x_BT, y_BT, mask_BT) -> (summed loss, token count), for exact means over a split.

    Takes whole numpy batches; each process sends only its rows to its devices."""
    dtype = compute_dtype(cfg.train.compute_dtype)
    mesh = mesh or sharding.make_mesh(cfg.mesh)
    params_sh = sharding.param_shardings(mesh, model.abstract_params(cfg.model))
    batch_sh = sharding.batch_sharding(mesh)

    def step(params, x_BT, y_BT, mask_BT):
        n = mask_BT.sum()
        params = jax.tree.map(lambda p: p.astype(dtype), params)
        return model.loss_fn(params, x_BT, y_BT, cfg.model, mask_BT=mask_BT) * n, n

    jitted = jax.jit(step, in_shardings=(params_sh, batch_sh, batch_sh, batch_sh), out_shardings=NamedSharding(mesh, P()))

    def eval_step(params, x_BT, y_BT, mask_BT):
        rows = sharding.process_rows(batch_sh, x_BT.shape)
        return jitted(params, *(sharding.global_batch(batch_sh, a[rows], a.shape) for a in (x_BT, y_BT, mask_BT)))

    return eval_step


def estimate_batches(ds: data.Dataset, cfg: Config) -> dict[str, list]:
    """The `eval_iters` random (x, y) batches of each split that every evaluation scores."""
    B, T = cfg.data.batch_size, cfg.model.block_size
    return {split: [data.get_batch(ds, split, B, T, cfg.train.seed, EVAL_STREAM + i) for i in range(cfg.train.eval_iters)]
            for split in ("train", "val")}


def estimate_loss(eval_step, params, batches: dict[str, list]) -> dict[str, float]:
    """Mean loss of each split over its `estimate_batches`."""
    out = {}
    for split, xy in batches.items():
        ones_BT = np.ones(xy[0][0].shape, np.int32)
        sums = [eval_step(params, x, y, ones_BT)[0] for x, y in xy]  # fetched once: no host sync per batch
        out[split] = float(sum(jax.device_get(sums))) / (ones_BT.size * len(xy))
    return out


def evaluate_split(params, ds: data.Dataset, cfg: Config, split: str = "val") -> dict[str, float]:
    """Exact mean loss over every token of a split (deterministic), and its perplexity."""
    eval_step = make_eval_step(cfg)
    sums = [eval_step(params, x, y, m) for x, y, m in data.eval_batches(ds, split, cfg.data.batch_size,
                                                                         cfg.model.block_size)]
    sums = jax.device_get(sums)  # fetched once: no host sync per batch
    total, count = sum(float(s) for s, _ in sums), sum(int(n) for _, n in sums)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def _batch(ds, cfg: Config, it: int, rows: slice = slice(None)):
    """The micro-batches of iteration `it` (only `rows` of each), stacked to [A, B, T]."""
    A, B, T = cfg.train.grad_accum, cfg.data.batch_size, cfg.model.block_size
    xs, ys = zip(*(data.get_batch(ds, "train", B, T, cfg.train.seed, it * A + a, rows) for a in range(A)))
    return np.stack(xs), np.stack(ys)


def _global_batch(ds, cfg: Config, it: int, batch_sh: NamedSharding):
    """Iteration `it`'s batch as global arrays, from the rows this process's devices hold."""
    shape = (cfg.train.grad_accum, cfg.data.batch_size, cfg.model.block_size)
    x, y = _batch(ds, cfg, it, sharding.process_rows(batch_sh, shape, axis=1))
    return sharding.global_batch(batch_sh, x, shape), sharding.global_batch(batch_sh, y, shape)


def _layer_groups(tree) -> dict:
    """A param-shaped tree by layer: wte, wpe, h0, h1, ..., ln_f."""
    return {"wte": tree["wte"], "wpe": tree["wpe"], **{f"h{i}": b for i, b in enumerate(tree["h"])},
            "ln_f": tree["ln_f"]}


def _layer_stats(params, grads, updates) -> dict:
    """LAYER.param_norm, LAYER.grad_norm and LAYER.update_ratio for each layer group."""
    out, layers = {}, [_layer_groups(t) for t in (params, grads, updates)]
    for name in layers[0]:
        p_norm, g_norm, u_norm = (optax.tree.norm(t[name]) for t in layers)
        out |= {f"{name}.param_norm": p_norm, f"{name}.grad_norm": g_norm, f"{name}.update_ratio": u_norm / p_norm}
    return out


def _step_range(spec: str) -> tuple[int, int]:
    start, _, end = spec.partition(":")
    if not (start.isdigit() and end.isdigit() and int(start) < int(end)):
        raise TrainError(f"--train.profile-steps {spec!r}: give START:END with START < END, e.g. 10:15")
    return int(start), int(end)


@contextlib.contextmanager
def _profiler(spec: str | None, run_dir: Path, log: Callable[[str], None]):
    """Yields hook(it, out=None): called before iteration `it` (out None) and after it (out its
    results), it traces iterations START..END-1 with JAX's profiler into RUN_DIR/profile
    (TensorBoard's profile plugin reads it; perfetto_trace.json.gz opens in ui.perfetto.dev)."""
    start, end = _step_range(spec) if spec else (-1, -1)
    tracing = False

    def hook(it: int, out=None):
        nonlocal tracing
        if it == start and out is None:
            jax.profiler.start_trace(str(run_dir / "profile"), create_perfetto_trace=True)
            tracing = True
        elif it == end - 1 and out is not None and tracing:
            jax.block_until_ready(out)
            jax.profiler.stop_trace()
            tracing = False
            log(f"profile of steps {start}-{end - 1} written to {run_dir}/profile")

    try:
        yield hook
    finally:
        if tracing:
            jax.profiler.stop_trace()


def _lm_eval():
    try:
        from jaxgpt import lm_eval_model
    except ImportError:
        raise TrainError("[eval] tasks need lm-evaluation-harness: pip install 'jaxgpt[eval]'") from None
    return lm_eval_model


def _lm_eval_metrics(cfg: Config, params, ds: data.Dataset) -> dict[str, float]:
    """`[eval] tasks` through lm-eval, as {TASK/METRIC: value} (no stderr: bootstrapping is slow)."""
    lm_eval_model = _lm_eval()
    lm = lm_eval_model.JaxGPTLM(loaded=(cfg.model, params, ds.tokenizer()), batch_size=cfg.data.batch_size)
    out = lm_eval_model.evaluate(lm, list(cfg.eval.tasks), cfg.eval.limit, cfg.eval.include_path, bootstrap_iters=0)
    return {f"{task}/{metric}": value for task, metrics in out["results"].items() for metric, value in metrics.items()
            if "," in metric and "_stderr" not in metric}  # METRIC,FILTER keys are the scores


def describe(cfg: Config) -> dict:
    """Parameter count, FLOPs and the bytes one device holds for a training step, from the
    compiled step's abstract shapes: nothing is allocated."""
    opt = optim.make_optimizer(cfg.optim)
    params = model.abstract_params(cfg.model)
    opt_state = jax.eval_shape(opt.init, params)
    x = jax.ShapeDtypeStruct((cfg.train.grad_accum, cfg.data.batch_size, cfg.model.block_size), jnp.int32)
    compiled = make_train_step(cfg, opt).lower(params, opt_state, x, x, 0).compile()
    nbytes = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))
    b = {"params": nbytes(params), "opt_state": nbytes(opt_state), "activations": compiled.memory_analysis().temp_size_in_bytes}
    b["total"] = sum(b.values())
    return {
        "params": model.count_params(params),
        "params_non_embedding": model.count_params(params, non_embedding=True),
        "flops_per_token": model.flops_per_token(cfg.model),
        "tokens_per_step": x.shape[0] * x.shape[1] * x.shape[2],
        "bytes": b,
    }


def with_data_vocab(cfg: Config, ds: data.Dataset) -> Config:
    """The model's vocabulary is the dataset's."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=ds.vocab_size))


@contextlib.contextmanager
def _stop_requests(log: Callable[[str], None]):
    """SIGINT/SIGTERM ask the loop to stop after the current step (and save); a second
    SIGINT stops at once. Preemptible cloud machines send SIGTERM."""
    requested: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.append(signal.Signals(signum).name)
        log(f"{requested[-1]}: stopping after this step to save a checkpoint (Ctrl-C again to quit at once)")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _config_differences(a: GPTConfig, b: GPTConfig) -> list[str]:
    return [f"model.{f.name} {getattr(a, f.name)!r} -> {getattr(b, f.name)!r}"
            for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def _check_resumable(run_dir: Path, cfg: Config, ds: data.Dataset) -> Config:
    """The config to resume with: the model must be the run's, and so must the tokenizer."""
    saved = checkpoint.run_config(run_dir)
    if cfg.train.init_from:  # the shape came from the checkpoint it started from, as recorded
        cfg = dataclasses.replace(cfg, model=saved.model)
    diffs = _config_differences(saved.model, cfg.model)
    if diffs:
        raise TrainError(f"{run_dir} holds a run with another model ({', '.join(diffs)}): "
                         "resume with the run's config.toml, or train into a new --out-dir")
    if checkpoint.data_meta(run_dir)["tokenizer"] != ds.meta["tokenizer"]:
        raise TrainError(f"dataset {ds.dir} uses another tokenizer or vocabulary than the run in {run_dir}: "
                         "pass the --data-dir it was trained on")
    return cfg


def _restore_latest(mngr, run_dir: Path, abstract_params, abstract_opt_state, log):
    """The newest readable checkpoint; unreadable newer ones are moved to RUN_DIR/corrupt/."""
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            return checkpoint.restore(mngr, step, abstract_params, abstract_opt_state)
        except Exception as e:  # any failure to read it: fall back to the previous checkpoint
            (run_dir / "corrupt").mkdir(exist_ok=True)
            dest = run_dir / "corrupt" / f"checkpoints-{step}"
            shutil.move(str(run_dir / "checkpoints" / str(step)), str(dest))
            mngr.reload()
            log(f"checkpoint {step} cannot be read ({type(e).__name__}: {str(e)[:200]}); moved it to {dest}, "
                "trying the previous one")
    raise TrainError(f"--resume: no readable checkpoint in {run_dir}/checkpoints; start a new run")


def _save(mngr, it: int, meta: dict, params, opt_state=None) -> None:
    try:
        checkpoint.save(mngr, it, meta, params, opt_state)
    except OSError as e:
        raise TrainError(f"could not save the checkpoint of step {it} in {mngr.directory}: {e.strerror or e}; "
                         f"the earlier checkpoints are intact: free space, then continue with --resume") from None


def train(cfg: Config, resume: bool = False, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Trains per `cfg` into `cfg.train.out_dir`; returns the last losses and how the run ended.

    `resume` continues from the newest readable checkpoint; `force` starts over in a run
    directory that already holds a run (its checkpoints are deleted)."""
    sharding.initialize_distributed()
    if jax.process_index() > 0:
        log = lambda s: None  # noqa: E731 (process 0 speaks for the run)
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(mesh, cfg.data.batch_size)
    ds = data.open_dataset(cfg.data.dir)
    cfg = with_data_vocab(cfg, ds)
    tc = cfg.train
    run_dir = Path(tc.out_dir)
    steps = checkpoint.saved_steps(run_dir)
    if resume and not steps:
        raise TrainError(f"--resume: no checkpoint in {run_dir}; start a new run without --resume")
    if not resume and steps:
        if not force:
            raise TrainError(f"{run_dir} already holds a run (step {max(steps)}): add --resume to continue it, "
                             "--force to delete it and start over, or pick another --out-dir")
        for name in ("checkpoints", "best", "tensorboard", "corrupt", "profile", "wandb"):
            shutil.rmtree(run_dir / name, ignore_errors=True)
        log(f"--force: deleted the run in {run_dir}")
    mngrs = checkpoint.managers(run_dir, tc.keep)  # this also removes what killed saves left

    opt = optim.make_optimizer(cfg.optim)
    schedule = optim.lr_schedule(cfg.optim)
    if cfg.eval.tasks:  # a typo fails now, not at the first evaluation
        _lm_eval().task_manager(list(cfg.eval.tasks), cfg.eval.include_path)
    start, best_val, evaluated_at_start = 0, math.inf, False
    if resume:
        cfg = _check_resumable(run_dir, cfg, ds)
        sh = shardings(cfg, opt, mesh)
        abstract = model.abstract_params(cfg.model)
        params, opt_state, meta = _restore_latest(
            mngrs["latest"], run_dir, sharding.with_shardings(abstract, sh["params"]),
            sharding.with_shardings(jax.eval_shape(opt.init, abstract), sh["opt_state"]), log)
        start, best_val = meta["step"], meta["best_val_loss"]
        evaluated_at_start = meta["val_loss"] is not None
        for step in mngrs["best"].all_steps():
            if step > start:  # saved by the part of the run that is being redone
                mngrs["best"].delete(step)
        log(f"resumed from {run_dir}/checkpoints/{start} (best val loss so far {best_val:.4f})")
    elif tc.init_from:
        from jaxgpt import hf

        model_cfg, params = hf.init_from(tc.init_from, cfg.model)
        cfg = dataclasses.replace(cfg, model=model_cfg)
        sh = shardings(cfg, opt, mesh)
        params = jax.device_put(params, sh["params"])
        opt_state = jax.jit(opt.init, out_shardings=sh["opt_state"])(params)
        log(f"initialised from {tc.init_from}")
    else:
        sh = shardings(cfg, opt, mesh)
        init = jax.jit(model.init_params, static_argnums=0, out_shardings=sh["params"])
        params = init(cfg.model, jax.random.key(tc.seed))
        opt_state = jax.jit(opt.init, out_shardings=sh["opt_state"])(params)
    if jax.process_index() == 0:
        checkpoint.write_run_files(run_dir, cfg, ds.meta)
    rlog = runlog.RunLog(run_dir, {"dir": str(ds.dir), **ds.meta}, start if resume else None,
                         tc.wandb_project, config_lib.to_dict(cfg), log)
    log(f"model: {model.count_params(params):,} parameters "
        f"({model.count_params(params, non_embedding=True):,} without positions), vocab {cfg.model.vocab_size}, "
        f"data {ds.dir} ({ds.tokens('train'):,} train tokens)")

    train_step = make_train_step(cfg, opt, mesh)
    eval_step, eval_batches = make_eval_step(cfg, mesh), estimate_batches(ds, cfg)
    tokens_per_it = tc.grad_accum * cfg.data.batch_size * cfg.model.block_size
    flops_per_it = model.flops_per_token(cfg.model) * tokens_per_it
    peak = tc.peak_flops or flops.peak_flops(list(mesh.devices.flat), compute_dtype(tc.compute_dtype))
    losses: dict[str, float] = {}
    rlog.status = "failed"  # until the loop ends as planned
    x, y = _global_batch(ds, cfg, start, sh["batch"])
    with _stop_requests(log) as stop, contextlib.closing(rlog), _profiler(tc.profile_steps, run_dir, log) as profile:
        t_log, steps_since_log = time.perf_counter(), 0
        for it in range(start, tc.max_iters + 1):
            if stop:
                meta = {"step": it, "val_loss": None, "best_val_loss": best_val}
                _save(mngrs["latest"], it, meta, params, opt_state)
                log(f"stopped at step {it}: checkpoint saved in {run_dir}/checkpoints/{it}; continue with --resume")
                rlog.status = "stopped"
                break
            if (it % tc.eval_interval == 0 or it == tc.max_iters) and not (it == start and evaluated_at_start):
                losses = estimate_loss(eval_step, params, eval_batches)
                bpb = ds.bits_per_byte(losses["val"])
                rlog.write({"step": it, "train_loss": losses["train"], "val_loss": losses["val"], "val_bpb": bpb})
                log(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                    + (f" ({bpb:.4f} bits per byte)" if bpb is not None else ""))
                if it > 0:
                    best_val = min(best_val, losses["val"])
                    meta = {"step": it, "val_loss": losses["val"], "best_val_loss": best_val}
                    if losses["val"] == best_val:  # before `latest`: a resume never lacks the best it recorded
                        _save(mngrs["best"], it, meta, params)
                    _save(mngrs["latest"], it, meta, params, opt_state)
                t_log, steps_since_log = time.perf_counter(), 0
            if cfg.eval.tasks and it > start and (it == tc.max_iters or (cfg.eval.every and it % cfg.eval.every == 0)):
                metrics = _lm_eval_metrics(cfg, params, ds)
                rlog.write({"step": it, **metrics})
                log(f"step {it}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                t_log, steps_since_log = time.perf_counter(), 0
            if it == tc.max_iters:
                rlog.status = "finished"
                break
            profile(it)
            params, opt_state, loss, stats = train_step(params, opt_state, x, y, it)
            profile(it, loss)
            x, y = _global_batch(ds, cfg, it + 1, sh["batch"])  # prepared while the device computes
            steps_since_log += 1
            if it % tc.log_interval == 0:
                loss, stats, in_a_row, skipped = jax.device_get(
                    (loss, stats, optim.nonfinite_count(opt_state), opt_state.total_notfinite))
                if in_a_row >= tc.max_nonfinite:
                    rlog.status = "diverged"
                    raise TrainError(
                        f"step {it}: {in_a_row} steps in a row had non-finite gradients and were skipped; "
                        f"the latest checkpoint ({mngrs['latest'].latest_step()}) is intact: "
                        "lower --optim.learning-rate or check the data, then --resume"
                    )
                dt = (time.perf_counter() - t_log) / steps_since_log
                rec = {"step": it, "loss": float(loss), "lr": float(schedule(it)),
                       "ms_per_step": 1000 * dt, "tokens_per_s": tokens_per_it / dt, "mfu": flops_per_it / dt / peak,
                       "skipped_steps": int(skipped)} | {k: float(v) for k, v in stats.items()}
                rlog.write(rec)
                log(f"iter {it}: loss {rec['loss']:.4f}, lr {rec['lr']:.2e}, {rec['ms_per_step']:.1f} ms/step, "
                    f"{rec['tokens_per_s']:,.0f} tok/s, MFU {100 * rec['mfu']:.1f}%" + (f", {skipped} steps skipped (non-finite)" if skipped else ""))
                t_log, steps_since_log = time.perf_counter(), 0
    return {"train_loss": losses.get("train"), "val_loss": losses.get("val"), "best_val_loss": best_val,
            "status": rlog.status}

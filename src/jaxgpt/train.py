"""The training loop: set up or resume a run, then step, evaluate, log and checkpoint.

The compiled steps live in step.py; opt-in extras (layer statistics, profiler, lm-eval,
Weights & Biases) are hooks the caller passes in (hooks.py). Params, optimizer state and
batches are laid out on the device mesh of `[mesh]` (see sharding.py); in a multi-host run
each process loads only its rows of every batch.
"""

import contextlib
import dataclasses
import itertools
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
from jax.sharding import Mesh

from jaxgpt import checkpoint, data, distributed, flops, model, optim, runlog, sharding, step
from jaxgpt.config import Config, GPTConfig, OptimConfig
from jaxgpt.errors import UserError
from jaxgpt.hooks import Hook

RUN_PARTS = ("checkpoints", "best", "tensorboard", "corrupt", "profile", "wandb")  # what --force deletes


class TrainError(UserError):
    """A run that cannot start as asked (e.g. resuming with no checkpoint)."""


def with_data_vocab(cfg: Config, ds: data.Dataset) -> Config:
    """The model's vocabulary is the dataset's."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=ds.vocab_size))


@contextlib.contextmanager
def _stop_requests(log: Callable[[str], None]):
    """SIGINT/SIGTERM ask the loop to stop after the current step (and save); a second
    SIGINT stops at once. Preemptible cloud machines send SIGTERM. With several processes,
    SIGTERM is left to JAX's preemption service (which has every process stop at one step,
    see distributed.stop_requested) and SIGINT is passed to it as SIGTERM."""
    requested: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    several = distributed.is_multiprocess()

    def handler(signum, frame):
        if requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        requested.append(signal.Signals(signum).name)
        log(f"{requested[-1]}: stopping after this step to save a checkpoint (Ctrl-C again to quit at once)")
        if several:
            os.kill(os.getpid(), signal.SIGTERM)

    previous = {sig: signal.signal(sig, handler) for sig in ((signal.SIGINT,) if several else (signal.SIGINT, signal.SIGTERM))}
    try:
        yield requested
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _config_differences(a: GPTConfig, b: GPTConfig) -> list[str]:
    return [f"model.{f.name} {getattr(a, f.name)!r} -> {getattr(b, f.name)!r}"
            for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)]


def _check_run_dir(run_dir: Path, resume: bool, force: bool, log: Callable[[str], None]) -> list[int]:
    """The committed steps of the run in `run_dir`: there must be some to resume, none to start
    (unless `force`, which deletes them)."""
    steps = checkpoint.saved_steps(run_dir)
    distributed.barrier("run-dir-read")  # every process has its list before one deletes or writes
    if resume and not steps:
        raise TrainError(f"--resume: no checkpoint in {run_dir}; start a new run without --resume")
    if not resume and steps:
        if not force:
            raise TrainError(f"{run_dir} already holds a run (step {max(steps)}): add --resume to continue it, "
                             "--force to delete it and start over, or pick another --out-dir")
        if jax.process_index() == 0:  # one process deletes, the others wait for it
            parts = [run_dir / name for name in RUN_PARTS if (run_dir / name).exists()]
            for path in parts:
                shutil.rmtree(path)
            log(f"--force: deleted {', '.join(str(p) for p in parts)}")
        distributed.barrier("force")
        return []
    return steps


def _optimizer_differences(saved: OptimConfig, new: OptimConfig, model_cfg: GPTConfig) -> list[str]:
    """The optim fields that differ, where they change the optimizer state's structure (what
    a checkpoint holds); none where only values such as the learning rate change."""
    abstract = model.abstract_params(model_cfg)
    a, b = (jax.eval_shape(optim.make_optimizer(o).init, abstract) for o in (saved, new))
    if jax.tree.structure(a) == jax.tree.structure(b) and all(
            (x.shape, x.dtype) == (y.shape, y.dtype) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))):
        return []
    return [f"optim.{f.name} {getattr(saved, f.name)!r} -> {getattr(new, f.name)!r}"
            for f in dataclasses.fields(saved) if getattr(saved, f.name) != getattr(new, f.name)]


def _resolve(cfg: Config, ds: data.Dataset, resume: bool) -> tuple[Config, dict | None]:
    """The config the run trains with, once and for all, and the params of `init_from` (or
    None): the vocabulary is the data's; a resumed run keeps its recorded model and must use
    its tokenizer; `init_from` gives the model's shape."""
    cfg = with_data_vocab(cfg, ds)
    run_dir = Path(cfg.train.out_dir)
    if resume:
        saved = checkpoint.run_config(run_dir)
        if cfg.train.init_from:  # the shape came from the checkpoint it started from, as recorded
            cfg = dataclasses.replace(cfg, model=saved.model)
        diffs = _config_differences(saved.model, cfg.model)
        if diffs:
            raise TrainError(f"{run_dir} holds a run with another model ({', '.join(diffs)}): "
                             "resume with the run's config.toml, or train into a new --out-dir")
        diffs = _optimizer_differences(saved.optim, cfg.optim, cfg.model)
        if diffs:
            raise TrainError(f"the checkpoints in {run_dir} hold the state of another optimizer ({', '.join(diffs)}): "
                             "resume with the optimizer settings of the run's config.toml, or train into a new --out-dir")
        if checkpoint.data_meta(run_dir)["tokenizer"] != ds.meta["tokenizer"]:
            raise TrainError(f"dataset {ds.dir} uses another tokenizer or vocabulary than the run in {run_dir}: "
                             "pass the --data-dir it was trained on")
        return cfg, None
    if cfg.train.init_from:
        from jaxgpt import hf

        model_cfg, params = hf.init_from(cfg.train.init_from, cfg.model)
        return dataclasses.replace(cfg, model=model_cfg), params
    return cfg, None


def _restore_latest(mngr, run_dir: Path, abstract_params, abstract_opt_state, log):
    """The newest readable checkpoint. A damaged newer one (files missing or unreadable) is
    moved to RUN_DIR/corrupt/ by process 0, once every process has failed to read it; other
    errors stop the run and move nothing."""
    for it in sorted(mngr.all_steps(), reverse=True):
        try:
            restored, error = checkpoint.restore(mngr, it, abstract_params, abstract_opt_state), None
        except checkpoint.DAMAGE as e:
            restored, error = None, e
        if distributed.all_agree(error is None):
            return restored
        dest = run_dir / "corrupt" / f"checkpoints-{it}"
        if jax.process_index() == 0:
            dest.parent.mkdir(exist_ok=True)
            shutil.move(str(run_dir / "checkpoints" / str(it)), str(dest))
        distributed.barrier(f"corrupt-{it}")
        mngr.reload()
        reason = f"{type(error).__name__}: {str(error)[:200]}" if error else "another process could not read it"
        log(f"checkpoint {it} cannot be read ({reason}); moved it to {dest} (delete it yourself once you no longer "
            "need it), trying the previous one")
    raise TrainError(f"--resume: no readable checkpoint in {run_dir}/checkpoints; start a new run")


def _initial_state(cfg: Config, opt, sh: dict, mngrs: dict, resume: bool, init_params, log):
    """(params, opt_state, meta) to start from: the latest readable checkpoint, `init_params`
    or a fresh initialisation. meta: the step, its val loss (None: not evaluated) and the best."""
    if resume:
        run_dir = Path(cfg.train.out_dir)
        abstract = model.abstract_params(cfg.model)
        params, opt_state, meta = _restore_latest(
            mngrs["latest"], run_dir, sharding.with_shardings(abstract, sh["params"]),
            sharding.with_shardings(jax.eval_shape(opt.init, abstract), sh["opt_state"]), log)
        for it in mngrs["best"].all_steps():
            if it > meta["step"]:  # saved by the part of the run that is being redone
                mngrs["best"].delete(it)
        log(f"resumed from {run_dir}/checkpoints/{meta['step']} (best val loss so far {meta['best_val_loss']:.4f})")
        return params, opt_state, meta
    if init_params is not None:
        params = jax.device_put(init_params, sh["params"])
        log(f"initialised from {cfg.train.init_from}")
    else:
        init = jax.jit(model.init_params, static_argnums=0, out_shardings=sh["params"])
        params = init(cfg.model, jax.random.key(cfg.train.seed))
    opt_state = jax.jit(opt.init, out_shardings=sh["opt_state"])(params)
    return params, opt_state, {"step": 0, "val_loss": None, "best_val_loss": math.inf}


def _save(mngr, it: int, meta: dict, params, opt_state=None) -> None:
    try:
        checkpoint.save(mngr, it, meta, params, opt_state)
    except OSError as e:
        raise TrainError(f"could not save the checkpoint of step {it} in {mngr.directory}: {e.strerror or e}; "
                         f"the earlier checkpoints are intact: free space, then continue with --resume") from None


def _checkpoint(mngrs: dict, it: int, val_loss: float, best_val: float, params, opt_state) -> float:
    """Saves iteration `it`'s checkpoint, and the best one when it is; returns the best val loss."""
    best_val = min(best_val, val_loss)
    meta = {"step": it, "val_loss": val_loss, "best_val_loss": best_val}
    if val_loss == best_val:  # before `latest`: a resume never lacks the best it recorded
        _save(mngrs["best"], it, meta, params)
    _save(mngrs["latest"], it, meta, params, opt_state)
    return best_val


def _step_line(rec: dict) -> str:
    skipped = rec["skipped_steps"]
    return (f"iter {rec['step']}: loss {rec['loss']:.4f}, lr {rec['lr']:.2e}, {rec['ms_per_step']:.1f} ms/step, "
            f"{rec['tokens_per_s']:,.0f} tok/s, MFU {100 * rec['mfu']:.1f}%"
            + (f", {skipped} steps skipped (non-finite)" if skipped else ""))


def _peak_flops(cfg: Config, mesh: Mesh) -> float:
    return cfg.train.peak_flops or flops.peak_flops(list(mesh.devices.flat), step.compute_dtype(cfg.train.compute_dtype, mesh))


def train(cfg: Config, resume: bool = False, force: bool = False, log: Callable[[str], None] = print,
          hooks: Sequence[Hook] = ()) -> dict:
    """Trains per `cfg` into `cfg.train.out_dir`; returns the last losses and how the run ended
    (status finished, stopped, or complete: a resumed run already at max_iters, left untouched).

    `resume` continues from the newest readable checkpoint; `force` starts over in a run
    directory that already holds a run (its checkpoints are deleted). `hooks` are the
    extras to run (`hooks.from_config(cfg)` builds those the config asks for)."""
    t_start = time.perf_counter()
    sharding.request_cpu_devices(cfg.mesh, cfg.data.batch_size, log)
    distributed.initialize(cfg.mesh.init_timeout)
    if jax.process_index() > 0:
        log = lambda s: None  # noqa: E731 (process 0 speaks for the run)
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_batch(mesh, cfg.data.batch_size)
    ds = data.open_dataset(cfg.data.dir)
    run_dir = Path(cfg.train.out_dir)
    steps = _check_run_dir(run_dir, resume, force, log)
    cfg, init_params = _resolve(cfg, ds, resume)
    tc = cfg.train
    if resume and max(steps) >= tc.max_iters:  # nothing to do: the run directory stays as it is
        log(f"the run in {run_dir} is complete at step {max(steps)} (max_iters {tc.max_iters}): "
            "to train further, resume with a larger --train.max-iters")
        return {"train_loss": None, "val_loss": None, "best_val_loss": None, "status": "complete"}

    opt, schedule = optim.make_optimizer(cfg.optim), optim.lr_schedule(cfg.optim)
    sh = step.shardings(cfg, opt, mesh)
    mngrs = checkpoint.managers(run_dir, tc.keep)  # this also removes what killed saves left
    params, opt_state, meta = _initial_state(cfg, opt, sh, mngrs, resume, init_params, log)
    start, best_val, evaluated_at_start = meta["step"], meta["best_val_loss"], meta["val_loss"] is not None
    if jax.process_index() == 0:
        checkpoint.write_run_files(run_dir, cfg, ds.meta, ds.dir)
    rlog = runlog.RunLog(run_dir, {"dir": str(ds.dir), **ds.meta}, start if resume else None)
    log(f"model: {model.count_params(params):,} parameters "
        f"({model.count_params(params, non_embedding=True):,} without positions), vocab {cfg.model.vocab_size}, "
        f"data {ds.dir} ({ds.tokens('train'):,} train tokens)")
    for h in hooks:
        h.begin(cfg, ds, start, log)

    def write(rec: dict) -> None:
        rlog.write(rec)
        for h in hooks:
            h.record(rec)

    train_steps = step.make_train_steps(cfg, opt, sh, [h.step_stats for h in hooks])
    eval_step, eval_batches = step.make_eval_step(cfg, sh), step.estimate_batches(ds, cfg, sh)
    tokens_per_it = tc.grad_accum * cfg.data.batch_size * cfg.model.block_size
    flops_per_it, peak = model.flops_per_token(cfg.model) * tokens_per_it, _peak_flops(cfg, mesh)
    losses: dict[str, float] = {}
    seconds = {"to_first_step": 0.0, "evals": 0.0, "checkpoint_saves": 0.0}  # where the run's time went

    def block_length(it: int) -> int:
        """Steps from `it` up to the next iteration that begins a block: an evaluation, the
        end, one a hook asks for, or steps_per_call."""
        k = 1
        while (k < tc.steps_per_call and it + k < tc.max_iters and (it + k) % tc.eval_interval
               and not any(h.starts_block(it + k) for h in hooks)):
            k += 1
        return k

    rlog.status = "failed"  # until the loop ends as planned
    it, K = start, block_length(start)
    x, y = step.global_train_batches(ds, cfg, it, K, sh["batches"])
    with _stop_requests(log) as stop, contextlib.closing(rlog):
        t_log, steps_since_log = time.perf_counter(), 0
        try:
            for check in itertools.count():
                if distributed.stop_requested(check, stop):
                    _save(mngrs["latest"], it, {"step": it, "val_loss": None, "best_val_loss": best_val}, params, opt_state)
                    log(f"stopped at step {it}: checkpoint saved in {run_dir}/checkpoints/{it}; continue with --resume")
                    rlog.status = "stopped"
                    break
                if (it % tc.eval_interval == 0 or it == tc.max_iters) and not (it == start and evaluated_at_start):
                    jax.block_until_ready(params)  # the steps dispatched before it are not the eval's time
                    t = time.perf_counter()
                    losses = step.estimate_loss(eval_step, params, eval_batches)
                    seconds["evals"] += time.perf_counter() - t
                    bpb = ds.bits_per_byte(losses["val"])
                    write({"step": it, "train_loss": losses["train"], "val_loss": losses["val"], "val_bpb": bpb})
                    log(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                        + (f" ({bpb:.4f} bits per byte)" if bpb is not None else ""))
                    if it > 0:
                        t = time.perf_counter()
                        best_val = _checkpoint(mngrs, it, losses["val"], best_val, params, opt_state)
                        seconds["checkpoint_saves"] += time.perf_counter() - t
                    t_log, steps_since_log = time.perf_counter(), 0
                for h in hooks if it > start else ():
                    metrics = h.metrics(it, params, it == tc.max_iters)
                    if metrics:
                        write({"step": it, **metrics})
                        log(f"step {it}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                        t_log, steps_since_log = time.perf_counter(), 0
                if it == tc.max_iters:
                    rlog.status = "finished"
                    break
                block = range(it, it + K)
                for h in hooks:
                    for i in block:
                        h.before_step(i)
                params, opt_state, loss_K, stats_K = train_steps(params, opt_state, x, y, it)
                for h in hooks:
                    for i in block:
                        h.after_step(i, loss_K[i - it])
                if it == start:  # set-up and compilation, measured once (with the first block's steps)
                    jax.block_until_ready(loss_K)
                    seconds["to_first_step"] = time.perf_counter() - t_start
                it, K = it + K, block_length(it + K) if it + K < tc.max_iters else 0
                if K:
                    x, y = step.global_train_batches(ds, cfg, it, K, sh["batches"])  # prepared while the device computes
                steps_since_log += len(block)
                logged = [i for i in block if i % tc.log_interval == 0]
                if logged:
                    loss_K, stats_K, in_a_row, skipped = jax.device_get(
                        (loss_K, stats_K, optim.nonfinite_count(opt_state), opt_state.total_notfinite))
                    if in_a_row >= tc.max_nonfinite:
                        rlog.status = "diverged"
                        raise TrainError(
                            f"step {block[-1]}: {in_a_row} steps in a row had non-finite gradients and were skipped; "
                            f"the latest checkpoint ({mngrs['latest'].latest_step()}) is intact: "
                            "lower --optim.learning-rate or check the data, then --resume"
                        )
                    dt = (time.perf_counter() - t_log) / steps_since_log
                    for i in logged:
                        k = i - block[0]
                        rec = {"step": i, "loss": float(loss_K[k]), "lr": float(schedule(i)), "ms_per_step": 1000 * dt,
                               "tokens_per_s": tokens_per_it / dt, "mfu": flops_per_it / dt / peak,
                               "skipped_steps": int(skipped)} | {n: float(v[k]) for n, v in stats_K.items()}
                        write(rec)
                        log(_step_line(rec))
                    t_log, steps_since_log = time.perf_counter(), 0
        finally:
            for h in hooks:
                h.end(rlog.status)
            seconds["total"] = time.perf_counter() - t_start
            rlog.info["seconds"] = seconds
    log(f"{rlog.status} in {seconds['total']:.1f} s: {seconds['to_first_step']:.1f} s to the end of the first step "
        f"(set-up, compilation), {seconds['evals']:.1f} s in evaluations, "
        f"{seconds['checkpoint_saves']:.1f} s saving checkpoints")
    return {"train_loss": losses.get("train"), "val_loss": losses.get("val"), "best_val_loss": best_val,
            "status": rlog.status}

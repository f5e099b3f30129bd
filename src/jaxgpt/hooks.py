"""Opt-in extras of a training run, attached to the loop as hooks: per-layer statistics,
profiler traces, lm-eval tasks and Weights & Biases.

`from_config(cfg)` builds those the config asks for; the caller passes them to
`train.train(cfg, hooks=...)`, so the loop itself never imports lm-eval, wandb or the
profiler. A hook of your own subclasses `Hook` and overrides what it needs.
"""

import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path

import jax
import optax

from jaxgpt import config as config_lib
from jaxgpt import data
from jaxgpt.config import Config, ConfigError

WANDB_HOST = ("api.wandb.ai", 443)


class Hook:
    """What the training loop calls, in this order; each method does nothing by default."""

    def begin(self, cfg: Config, ds: data.Dataset, start: int, log: Callable[[str], None]) -> None:
        """Once before the loop: the resolved config, the dataset and the first iteration."""

    def step_stats(self, params, grads, updates) -> dict:
        """Scalars computed inside the jitted step from its own gradients (traced); logged at log steps."""
        return {}

    def starts_block(self, it: int) -> bool:
        """Whether iteration `it` must begin a block of steps (the loop runs
        `train.steps_per_call` steps a call): true where `metrics` needs that iteration's
        params or the hook acts between two steps."""
        return False

    def metrics(self, it: int, params, last: bool) -> dict:
        """Extra metrics at iteration `it` (after its evaluation, before its step; `last` at
        max_iters), written to the run's metrics. Called where a block of steps begins (see
        `starts_block`); not at the iteration a run starts from."""
        return {}

    def before_step(self, it: int) -> None:
        """Right before the block holding iteration `it`'s step is dispatched."""

    def after_step(self, it: int, loss) -> None:
        """Right after that block is dispatched; `loss` is the step's (not yet computed) loss array."""

    def record(self, rec: dict) -> None:
        """Every metrics record the run writes (metrics.jsonl, TensorBoard)."""

    def end(self, status: str) -> None:
        """When the loop ends: finished, stopped, diverged or failed."""


def layer_groups(tree) -> dict:
    """A param-shaped tree by layer: wte, wpe (with learned positions), h0, h1, ..., ln_f, lm_head (untied)."""
    return {**{k: tree[k] for k in ("wte", "wpe") if k in tree}, **{f"h{i}": b for i, b in enumerate(tree["h"])},
            **{k: tree[k] for k in ("ln_f", "lm_head") if k in tree}}


class LayerStats(Hook):
    """LAYER.param_norm, LAYER.grad_norm and LAYER.update_ratio (update norm / param norm)
    of each layer group, from the step's own gradients and update (`train.layer_stats`)."""

    def step_stats(self, params, grads, updates) -> dict:
        out, layers = {}, [layer_groups(t) for t in (params, grads, updates)]
        for name in layers[0]:
            p_norm, g_norm, u_norm = (optax.tree.norm(t[name]) for t in layers)
            out |= {f"{name}.param_norm": p_norm, f"{name}.grad_norm": g_norm, f"{name}.update_ratio": u_norm / p_norm}
        return out


def step_range(spec: str) -> tuple[int, int]:
    start, _, end = spec.partition(":")
    if not (start.isdigit() and end.isdigit() and int(start) < int(end)):
        raise ConfigError(f"--train.profile-steps {spec!r}: give START:END with START < END, e.g. 10:15")
    return int(start), int(end)


class Profiler(Hook):
    """Traces iterations START..END-1 (`train.profile_steps`) with JAX's profiler into
    RUN_DIR/profile (TensorBoard's profile plugin reads it; perfetto_trace.json.gz opens in
    ui.perfetto.dev). With several processes, each traces its own devices into
    RUN_DIR/profile/process_N."""

    def __init__(self, spec: str, run_dir: Path):
        self.first, end = step_range(spec)
        self.last = end - 1
        self.dir, self.tracing, self.log = run_dir / "profile", False, print

    def begin(self, cfg, ds, start, log):
        self.log = log
        if jax.process_count() > 1:
            self.dir = self.dir / f"process_{jax.process_index()}"

    def starts_block(self, it):
        return it in (self.first, self.last + 1)

    def before_step(self, it):
        if it == self.first:
            jax.profiler.start_trace(str(self.dir), create_perfetto_trace=True)
            self.tracing = True

    def after_step(self, it, loss):
        if it == self.last and self.tracing:
            jax.block_until_ready(loss)
            self.end(None)
            self.log(f"profile of steps {self.first}-{self.last} written to {self.dir}")

    def end(self, status):
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


def _lm_eval():
    try:
        from jaxgpt import lm_eval_model
    except ImportError:
        raise ConfigError("[eval] tasks need lm-evaluation-harness: pip install 'jaxgpt[eval]'") from None
    return lm_eval_model


class LmEval(Hook):
    """`[eval] tasks` through lm-eval every `eval.every` steps and at the end, as
    {TASK/METRIC: value} (no stderr: bootstrapping is slow). Unknown tasks fail here, when
    the hook is made, not at the first evaluation."""

    def __init__(self, cfg: Config):
        self.ec, self.batch_size = cfg.eval, cfg.data.batch_size
        self.lm_eval = _lm_eval()
        self.lm_eval.task_manager(list(self.ec.tasks), self.ec.include_path)

    def begin(self, cfg, ds, start, log):
        if jax.process_count() > 1:
            raise ConfigError("[eval] tasks run in a single process: leave them out of a multi-process run and "
                              "evaluate a checkpoint afterwards with jaxgpt eval --tasks")
        self.model_cfg, self.tokenizer = cfg.model, ds.tokenizer()

    def starts_block(self, it):
        return bool(self.ec.every) and it % self.ec.every == 0

    def metrics(self, it, params, last):
        if not (last or (self.ec.every and it % self.ec.every == 0)):
            return {}
        lm = self.lm_eval.JaxGPTLM(loaded=(self.model_cfg, params, self.tokenizer), batch_size=self.batch_size)
        out = self.lm_eval.evaluate(lm, list(self.ec.tasks), self.ec.limit, self.ec.include_path, bootstrap_iters=0)
        return {f"{task}/{metric}": value for task, metrics in out["results"].items() for metric, value in metrics.items()
                if "," in metric and "_stderr" not in metric}  # METRIC,FILTER keys are the scores


def _online(host: tuple[str, int]) -> bool:
    try:
        socket.create_connection(host, timeout=5).close()
    except OSError:
        return False
    return True


class Wandb(Hook):
    """Every metrics record also to a Weights & Biases project (`train.wandb_project`), offline
    with a note when the service is unreachable. A resumed run continues the same W&B run: its
    id is kept in RUN_DIR/wandb/run_id. Only process 0 logs."""

    def __init__(self, project: str, run_dir: Path):
        try:
            import wandb
        except ImportError:
            raise ConfigError("--train.wandb-project needs wandb: pip install 'jaxgpt[wandb]'") from None
        self.wandb, self.project, self.run_dir, self.run = wandb, project, run_dir, None

    def begin(self, cfg, ds, start, log):
        if jax.process_index() > 0:
            return
        id_file = self.run_dir / "wandb" / "run_id"
        run_id = id_file.read_text().strip() if start > 0 and id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
        mode = os.environ.get("WANDB_MODE")
        if mode is None and not _online(WANDB_HOST):
            mode = "offline"
            log(f"wandb: {WANDB_HOST[0]} is unreachable, logging offline to {self.run_dir}/wandb "
                "(upload later with wandb sync)")
        self.run = self.wandb.init(project=self.project, name=self.run_dir.name, dir=str(self.run_dir), id=run_id,
                                   resume="allow", config=config_lib.to_dict(cfg), mode=mode)

    def record(self, rec):
        if self.run is not None:
            self.run.log({k: v for k, v in rec.items() if k != "step" and isinstance(v, (int, float))}, step=rec["step"])

    def end(self, status):
        if self.run is not None:
            self.run.finish()


def from_config(cfg: Config) -> list[Hook]:
    """The hooks `cfg` asks for: train.layer_stats, train.profile_steps, eval.tasks, train.wandb_project."""
    run_dir, tc = Path(cfg.train.out_dir), cfg.train
    hooks: list[Hook] = []
    if tc.layer_stats:
        hooks.append(LayerStats())
    if tc.profile_steps:
        hooks.append(Profiler(tc.profile_steps, run_dir))
    if cfg.eval.tasks:
        hooks.append(LmEval(cfg))
    if tc.wandb_project:
        hooks.append(Wandb(tc.wandb_project, run_dir))
    return hooks

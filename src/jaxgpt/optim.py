"""The optimizer: global-norm clipping, then AdamW with weight decay on matrices only (or
Muon on the blocks' matrices and AdamW on the rest), under a learning-rate schedule with
linear warmup (nanoGPT's recipe is warmup + cosine decay to `min_lr`; constant, linear,
rsqrt and warmup-stable-decay are the others), all built from optax."""

import jax
import jax.numpy as jnp
import optax

from jaxgpt.config import ConfigError, OptimConfig

SCHEDULES = ("constant", "linear", "cosine", "rsqrt", "wsd")


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup to `learning_rate` over `warmup_iters` (step t gets (t + 1) / (warmup_iters + 1)
    of it, as in nanoGPT, so the first step already learns), then `cfg.schedule`:

    constant  learning_rate
    linear    down to min_lr at lr_decay_iters, then flat
    cosine    half a cosine down to min_lr at lr_decay_iters, then flat (nanoGPT)
    rsqrt     learning_rate * sqrt(warmup_iters / step)
    wsd       flat until the last `decay_fraction` of lr_decay_iters, then linear down to min_lr
    """
    peak, warmup = cfg.learning_rate, cfg.warmup_iters
    start = peak / (warmup + 1)
    decay_steps = max(cfg.lr_decay_iters, warmup + 1)
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=start, peak_value=peak, warmup_steps=warmup, decay_steps=decay_steps, end_value=cfg.min_lr
        )
    if cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, cfg.min_lr, decay_steps - warmup)
    elif cfg.schedule == "rsqrt":
        w = max(warmup, 1)
        after = lambda step: peak * jnp.sqrt(w / jnp.maximum(step + warmup, w))  # noqa: E731 (step counts from warmup)
    elif cfg.schedule == "wsd":
        decay_start = decay_steps - round(cfg.decay_fraction * decay_steps)
        if decay_start < warmup:
            raise ConfigError(f"optim.decay_fraction {cfg.decay_fraction} starts the decay at step {decay_start}, "
                              f"inside the {warmup} warmup steps: lower it or raise optim.lr_decay_iters")
        after = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, cfg.min_lr, decay_steps - decay_start)],
            [decay_start - warmup],
        )
    else:
        raise ConfigError(f"unknown optim.schedule {cfg.schedule!r}: use one of {', '.join(SCHEDULES)}")
    return optax.join_schedules([optax.linear_schedule(start, peak, warmup), after], [warmup])


def decay_mask(params):
    """Weight decay on 2-D tensors (matmul weights, embeddings); none on biases and norm scales."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


NEVER = 2**31 - 1


def muon_labels(params):
    """'muon' for the kernels of the blocks (the hidden matrices), 'adamw' for the rest."""
    def label(path, _):
        keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return "muon" if keys[0] == "h" and keys[-1] == "kernel" else "adamw"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The update rule. A step whose gradients are not finite changes nothing and is counted
    (`nonfinite_count`); the training loop decides when too many in a row end the run."""
    schedule = lr_schedule(cfg)
    adamw = optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.optimizer == "muon":
        ratio = cfg.muon_learning_rate / cfg.learning_rate
        muon = optax.contrib.muon(lambda step: ratio * schedule(step), beta=cfg.muon_momentum,
                                  weight_decay=cfg.weight_decay)
        update = optax.partition({"muon": muon, "adamw": adamw}, muon_labels)
    elif cfg.optimizer == "adamw":
        update = adamw
    else:
        raise ConfigError(f"unknown optim.optimizer {cfg.optimizer!r}: use adamw or muon")
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        update,
    )
    return optax.apply_if_finite(inner, max_consecutive_errors=NEVER)


def nonfinite_count(opt_state) -> jax.Array:
    """Steps skipped in a row because their gradients were not finite."""
    return opt_state.notfinite_count

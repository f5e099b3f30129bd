"""The optimizer: global-norm clipping, then AdamW with weight decay on matrices only,
under linear warmup and cosine decay to `min_lr` (nanoGPT's recipe, built from optax)."""

import jax
import optax

from jaxgpt.config import OptimConfig


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, cosine down to `min_lr` at `lr_decay_iters`, then flat."""
    decay_steps = max(cfg.lr_decay_iters, cfg.warmup_iters + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_iters,
        decay_steps=decay_steps,
        end_value=cfg.min_lr,
    )


def decay_mask(params):
    """Weight decay on 2-D tensors (matmul weights, embeddings); none on biases and norm scales."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


NEVER = 2**31 - 1


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The update rule. A step whose gradients are not finite changes nothing and is counted
    (`nonfinite_count`); the training loop decides when too many in a row end the run."""
    inner = optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(
            lr_schedule(cfg),
            b1=cfg.beta1,
            b2=cfg.beta2,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        ),
    )
    return optax.apply_if_finite(inner, max_consecutive_errors=NEVER)


def nonfinite_count(opt_state) -> jax.Array:
    """Steps skipped in a row because their gradients were not finite."""
    return opt_state.notfinite_count

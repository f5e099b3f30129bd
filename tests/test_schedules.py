"""The optimizer against formulas: each learning-rate schedule against its closed form at
the steps where it changes shape, and the muon optimizer (clipping, then Muon on the
blocks' matrices and AdamW on the rest) against Newton-Schulz and Adam written in NumPy."""

import math

import jax
import numpy as np
import pytest

from jaxgpt import model, optim
from jaxgpt.config import ConfigError, GPTConfig, OptimConfig

PEAK, MIN, WARMUP, DECAY = 1e-3, 1e-4, 100, 1000


def closed_form(name: str, t: int, decay_fraction: float = 0.2) -> float:
    if t < WARMUP:
        return PEAK * (t + 1) / (WARMUP + 1)  # nanoGPT's get_lr
    if name == "constant":
        return PEAK
    if name == "rsqrt":
        return PEAK * math.sqrt(WARMUP / t)
    if t >= DECAY:
        return MIN
    if name == "linear":
        return PEAK + (MIN - PEAK) * (t - WARMUP) / (DECAY - WARMUP)
    if name == "cosine":  # nanoGPT's get_lr
        return MIN + 0.5 * (1 + math.cos(math.pi * (t - WARMUP) / (DECAY - WARMUP))) * (PEAK - MIN)
    start = DECAY - decay_fraction * DECAY
    return PEAK if t <= start else PEAK + (MIN - PEAK) * (t - start) / (DECAY - start)


KEY_STEPS = [0, 1, 50, 99, 100, 101, 250, 550, 799, 800, 801, 900, 999, 1000, 1001, 5000]


@pytest.mark.parametrize("name", optim.SCHEDULES)
def test_schedule_matches_its_closed_form(name):
    schedule = optim.lr_schedule(OptimConfig(learning_rate=PEAK, min_lr=MIN, warmup_iters=WARMUP,
                                             lr_decay_iters=DECAY, schedule=name))
    for t in KEY_STEPS:
        assert float(schedule(t)) == pytest.approx(closed_form(name, t), rel=1e-5, abs=1e-12), (name, t)


def test_wsd_decay_fraction():
    cfg = OptimConfig(learning_rate=PEAK, min_lr=MIN, warmup_iters=WARMUP, lr_decay_iters=DECAY,
                      schedule="wsd", decay_fraction=0.5)
    schedule = optim.lr_schedule(cfg)
    for t in (100, 499, 500, 501, 750, 1000):
        assert float(schedule(t)) == pytest.approx(closed_form("wsd", t, 0.5), rel=1e-5)


def test_bad_schedules_are_config_errors():
    with pytest.raises(ConfigError, match="unknown optim.schedule 'cosin'"):
        optim.lr_schedule(OptimConfig(schedule="cosin"))
    with pytest.raises(ConfigError, match="inside the 100 warmup steps"):
        optim.lr_schedule(OptimConfig(warmup_iters=100, lr_decay_iters=110, schedule="wsd", decay_fraction=0.5))


def newton_schulz(G: np.ndarray) -> np.ndarray:
    """Muon's orthogonalisation (Keller Jordan's modded-nanogpt): five steps of the quintic
    X <- aX + (bA + cA^2)X with A = XX^T, from X = G / |G|_F, on the wide orientation."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / (np.linalg.norm(X) + 1e-8)
    for _ in range(5):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


def test_muon_updates_follow_the_formula():
    """Three updates of optimizer = muon on a GPT's params against NumPy (float64): the gradient
    clipped to global norm grad_clip; each block matrix W [in, out] moves by
    -lr_muon (sqrt(max(1, out/in)) NS(m^) + wd W), with m = beta m + (1 - beta) g and Nesterov's
    m^ = beta m / (1 - beta^(t+1)) + (1 - beta) g / (1 - beta^t); every other leaf by AdamW
    (decay on matrices only) at learning_rate. Both rates follow the schedule."""
    cfg = OptimConfig(optimizer="muon", learning_rate=PEAK, min_lr=MIN, warmup_iters=WARMUP, lr_decay_iters=DECAY,
                      muon_learning_rate=0.05, muon_momentum=0.9, weight_decay=0.1, beta1=0.8, beta2=0.9, grad_clip=1.0)
    params = model.init_params(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11),
                               jax.random.key(0))
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [[getattr(k, "key", getattr(k, "idx", None)) for k in path] for path, _ in paths]
    is_muon = [n[0] == "h" and n[-1] == "kernel" for n in names]
    assert sum(is_muon) == 8 and not all(is_muon)  # 4 matrices a block; embeddings, norms and biases on AdamW
    p = [np.asarray(x, np.float64) for x in jax.tree.leaves(params)]
    m, v = [np.zeros_like(x) for x in p], [np.zeros_like(x) for x in p]
    opt = optim.make_optimizer(cfg)
    state = opt.init(params)
    rng = np.random.default_rng(0)
    b1, b2, beta, wd = cfg.beta1, cfg.beta2, cfg.muon_momentum, cfg.weight_decay
    for t in range(1, 4):
        scale = 1e-3 if t == 3 else 1.0  # the third gradient is below grad_clip: not clipped
        g = [scale * rng.standard_normal(x.shape) for x in p]
        got, state = opt.update(jax.tree.unflatten(treedef, [np.float32(x) for x in g]), state,
                                jax.tree.unflatten(treedef, [np.float32(x) for x in p]))
        norm = math.sqrt(sum((x ** 2).sum() for x in g))
        assert (norm > cfg.grad_clip) == (t < 3)
        g = [x * min(1.0, cfg.grad_clip / norm) for x in g]
        lr = closed_form("cosine", t - 1)
        for i, got_i in enumerate(jax.tree.leaves(got)):
            if is_muon[i]:
                m[i] = beta * m[i] + (1 - beta) * g[i]
                m_hat = beta * m[i] / (1 - beta ** (t + 1)) + (1 - beta) * g[i] / (1 - beta ** t)
                fan_in, fan_out = p[i].shape
                want = -cfg.muon_learning_rate / PEAK * lr * (
                    math.sqrt(max(1.0, fan_out / fan_in)) * newton_schulz(m_hat) + wd * p[i])
            else:
                m[i] = b1 * m[i] + (1 - b1) * g[i]
                v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
                u = m[i] / (1 - b1 ** t) / (np.sqrt(v[i] / (1 - b2 ** t)) + 1e-8)
                want = -lr * (u + (wd * p[i] if p[i].ndim >= 2 else 0.0))
            np.testing.assert_allclose(np.asarray(got_i), want, rtol=1e-4, atol=1e-5 * np.abs(want).max(),
                                       err_msg=f"step {t}, {names[i]}")
            p[i] = p[i] + want

"""Each learning-rate schedule against its closed form at the steps where it changes shape."""

import math

import pytest

from jaxgpt import optim
from jaxgpt.config import ConfigError, OptimConfig

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

import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxgpt import checkpoint, config, data, model, optim, step, train
from jaxgpt.config import Config, DataConfig, GPTConfig, OptimConfig, TrainConfig


def tiny_config(data_dir, out_dir, **train_kw) -> Config:
    return Config(
        model=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, dropout=0.1, bias=False),
        data=DataConfig(dir=str(data_dir), batch_size=4),
        optim=OptimConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=5, lr_decay_iters=20),
        train=TrainConfig(**{"max_iters": 20, "eval_interval": 10, "eval_iters": 2, "log_interval": 1,
                             "out_dir": str(out_dir), **train_kw}),
    )


def train_losses(run_dir) -> dict[int, float]:
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_resume_reproduces_an_uninterrupted_run(tmp_path, tiny_dataset):
    straight = tiny_config(tiny_dataset, tmp_path / "straight")
    train.train(straight, log=lambda s: None)

    first = tiny_config(tiny_dataset, tmp_path / "resumed", max_iters=10)
    train.train(first, log=lambda s: None)
    train.train(tiny_config(tiny_dataset, tmp_path / "resumed"), resume=True, log=lambda s: None)

    a, b = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(20))
    assert a == b  # bitwise: same batches, dropout keys, optimizer state and schedule


def test_run_directory_and_checkpoints(tmp_path, tiny_dataset):
    cfg = tiny_config(tiny_dataset, tmp_path / "run")
    result = train.train(cfg, log=lambda s: None)
    run = tmp_path / "run"
    saved = config.loads((run / "config.toml").read_text())
    assert saved.model.vocab_size == data.open_dataset(tiny_dataset).vocab_size
    assert saved.train == cfg.train
    records = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val_loss" in r] == [0, 10, 20]
    assert all("loss" in r and "step" in r for r in records if "val_loss" not in r)
    best = min((r for r in records if "val_loss" in r and r["step"] > 0), key=lambda r: r["val_loss"])
    _, params, meta = checkpoint.load_params(run, "best")
    assert (meta["step"], meta["val_loss"]) == (best["step"], best["val_loss"]) == (best["step"], result["best_val_loss"])
    ds = data.open_dataset(tiny_dataset)  # the best checkpoint holds the params that scored it
    rescored = step.estimate_loss(step.make_eval_step(saved), params, step.estimate_batches(ds, saved))["val"]
    assert rescored == pytest.approx(best["val_loss"], rel=1e-6)
    _, _, meta = checkpoint.load_params(run, "latest")
    assert meta["step"] == 20


def test_checkpoint_round_trip_is_exact(tmp_path):
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, bias=True)
    params = model.init_params(cfg, jax.random.key(3))
    opt = optim.make_optimizer(OptimConfig())
    opt_state = opt.init(params)
    mngr = checkpoint.managers(tmp_path, keep=2)["latest"]
    checkpoint.save(mngr, 7, {"step": 7}, params, opt_state)
    abstract = model.abstract_params(cfg)
    got_params, got_state, meta = checkpoint.restore(mngr, 7, abstract, jax.eval_shape(opt.init, abstract))
    assert meta == {"step": 7}
    for a, b in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves((got_params, got_state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(opt_state) == jax.tree.structure(got_state)


def test_grad_accumulation_matches_one_big_batch(tiny_dataset):
    base = tiny_config(tiny_dataset, "unused")
    base = dataclasses.replace(base, model=dataclasses.replace(base.model, dropout=0.0, vocab_size=65))
    ds = data.open_dataset(tiny_dataset)
    base = train.with_data_vocab(base, ds)
    params = model.init_params(base.model, jax.random.key(0))
    x, y = step.train_batch(ds, dataclasses.replace(base, train=dataclasses.replace(base.train, grad_accum=2)), 0)
    opt = optim.make_optimizer(base.optim)

    accum = dataclasses.replace(base, train=dataclasses.replace(base.train, grad_accum=2))
    p_acc, _, loss_acc, stats_acc = step.make_train_step(accum, opt)(
        jax.tree.map(lambda a: a.copy(), params), opt.init(params), x, y, 3)
    p_one, _, loss_one, stats_one = step.make_train_step(base, opt)(
        jax.tree.map(lambda a: a.copy(), params), opt.init(params), x.reshape(1, 8, -1), y.reshape(1, 8, -1), 3)
    np.testing.assert_allclose(float(loss_acc), float(loss_one), rtol=1e-5)
    np.testing.assert_allclose(float(stats_acc["grad_norm"]), float(stats_one["grad_norm"]), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p_acc), jax.tree.leaves(p_one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_a_block_of_steps_is_the_single_steps(tiny_dataset):
    """make_train_steps over K batches from iteration `it` = K make_train_step calls at it,
    it + 1, ...: same batches, dropout keys (dropout is on), schedule and optimizer state."""
    cfg = tiny_config(tiny_dataset, "unused")
    ds = data.open_dataset(tiny_dataset)
    cfg = train.with_data_vocab(cfg, ds)
    opt = optim.make_optimizer(cfg.optim)
    fresh = lambda: model.init_params(cfg.model, jax.random.key(0))  # noqa: E731 (steps donate their params)
    batches = [step.train_batch(ds, cfg, i) for i in range(5, 8)]

    params, state, singles = fresh(), opt.init(fresh()), []
    one = step.make_train_step(cfg, opt)
    for i, (x, y) in zip(range(5, 8), batches):
        params, state, loss, stats = one(params, state, x, y, i)
        singles.append((float(loss), float(stats["grad_norm"])))
    x_K, y_K = (np.stack(a) for a in zip(*batches))
    p_blk, s_blk, loss_K, stats_K = step.make_train_steps(cfg, opt)(fresh(), opt.init(fresh()), x_K, y_K, 5)
    np.testing.assert_allclose(np.asarray(loss_K), [a for a, _ in singles], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stats_K["grad_norm"]), [b for _, b in singles], rtol=1e-5)
    for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves((p_blk, s_blk))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_steps_per_call_changes_no_loss_or_log(tmp_path, tiny_dataset):
    """One step a call and 7 (blocks cut short by the evaluations every 10 and the end)
    log the same iterations with the same losses."""
    runs = {}
    for k in (1, 7):
        train.train(tiny_config(tiny_dataset, tmp_path / f"k{k}", steps_per_call=k), log=lambda s: None)
        runs[k] = train_losses(tmp_path / f"k{k}")
    assert sorted(runs[1]) == sorted(runs[7]) == list(range(20))
    np.testing.assert_allclose([runs[7][i] for i in range(20)], [runs[1][i] for i in range(20)], rtol=1e-6)
    with pytest.raises(config.ConfigError, match="steps_per_call must be at least 1"):
        TrainConfig(steps_per_call=0)


def test_resume_without_checkpoint_and_reusing_a_run_dir_are_refused(tmp_path, tiny_dataset):
    with pytest.raises(train.TrainError, match="no checkpoint"):
        train.train(tiny_config(tiny_dataset, tmp_path / "empty"), resume=True, log=lambda s: None)
    cfg = tiny_config(tiny_dataset, tmp_path / "run", max_iters=10)
    train.train(cfg, log=lambda s: None)
    with pytest.raises(train.TrainError, match="already holds a run"):
        train.train(cfg, log=lambda s: None)


def test_exact_eval_matches_forward(tiny_dataset):
    cfg = train.with_data_vocab(tiny_config(tiny_dataset, "unused"), data.open_dataset(tiny_dataset))
    params = model.init_params(cfg.model, jax.random.key(0))
    ds = data.open_dataset(tiny_dataset)
    val = np.asarray(ds.splits["val"][0]).astype(np.int32)
    T = cfg.model.block_size
    forward = jax.jit(model.forward, static_argnums=2)  # eager, its ~190 calls took ~7 s
    nll = []
    for s in range(0, val.size - 1, T):
        x, y = val[s : s + T][None], val[s + 1 : s + T + 1][None]
        x = x[:, : y.shape[1]]
        logp = jax.nn.log_softmax(forward(params, x, cfg.model))
        nll.append(-np.take_along_axis(np.asarray(logp), y[..., None], -1).ravel())
    want = np.concatenate(nll).mean()
    got = step.evaluate_split(params, ds, cfg, "val")
    assert got["tokens"] == val.size - 1
    np.testing.assert_allclose(got["loss"], want, rtol=1e-5)

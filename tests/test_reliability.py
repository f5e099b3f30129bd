"""Crash safety: kills at any moment, signals, non-finite steps, damaged checkpoints, full
disks and wrong inputs never lose the last good checkpoint, and resuming stays exact."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import checkpoint, cli, model, optim, train
from jaxgpt.config import OptimConfig

from test_train import tiny_config, train_losses

QUIET = {"log": lambda s: None}

# Runs `jaxgpt train` in a subprocess that hurts itself at a chosen point:
# KILL="batch:N" (SIGKILL when iteration N's batch is made), "save:N" (SIGKILL in the middle
# of saving step N, after the files are written and before orbax commits them),
# "signal:N:SIG[:SIG]" (sends itself signals at iteration N).
DRIVER = textwrap.dedent('''
    import os, signal, sys
    from orbax.checkpoint._src.path import atomicity
    from jaxgpt import cli, step

    what, n, *sigs = os.environ["KILL"].split(":")
    n = int(n)
    batch = step.train_batch

    def hurt_batch(ds, cfg, it, *rows):
        if it == n and what == "batch":
            os.kill(os.getpid(), signal.SIGKILL)
        if it == n and what == "signal":
            for sig in sigs:
                os.kill(os.getpid(), getattr(signal, sig))
        return batch(ds, cfg, it, *rows)

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def hurt_finalize(self, *args, **kwargs):
        if what == "save" and self._final_path.name == str(n):
            os.kill(os.getpid(), signal.SIGKILL)
        return await finalize(self, *args, **kwargs)

    step.train_batch = hurt_batch
    atomicity.AtomicRenameTemporaryPath.finalize = hurt_finalize
    sys.exit(cli.main(sys.argv[1:]))
''')


def train_args(data_dir, run_dir, max_iters=12):
    # two steps a call: a batch of an odd iteration is read while a block runs, an even one begins a block
    return ["train", "shakespeare-char-cpu", "--data-dir", str(data_dir), "--out-dir", str(run_dir),
            "--model.n-layer", "2", "--model.n-head", "2", "--model.n-embd", "32", "--model.block-size", "32",
            "--model.dropout", "0.1", "--data.batch-size", "4", "--train.max-iters", str(max_iters),
            "--train.eval-interval", "4", "--train.eval-iters", "2", "--train.log-interval", "1",
            "--train.keep", "1", "--train.steps-per-call", "2", "--optim.warmup-iters", "5",
            "--optim.lr-decay-iters", "20"]


def run_driver(tmp_path, kill, args):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "KILL": kill}
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dataset):
    """Losses of the uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert cli.main(train_args(tiny_dataset, run_dir)) == 0
    return train_losses(run_dir)


@pytest.mark.parametrize("kill", ["batch:6", "save:8", "batch:10"])
def test_sigkill_anywhere_then_resume_is_exact(tmp_path, tiny_dataset, reference, kill):
    run_dir = tmp_path / "run"
    r = run_driver(tmp_path, kill, train_args(tiny_dataset, run_dir))
    assert r.returncode == -signal.SIGKILL, r.stderr
    expected = {"batch:6": 4, "save:8": 4, "batch:10": 8}[kill]
    # the older checkpoint is pruned only after a newer one commits; a killed save is never picked
    assert checkpoint.saved_steps(run_dir) == [expected]
    assert cli.main([*train_args(tiny_dataset, run_dir), "--resume"]) == 0
    assert not [p for p in (run_dir / "checkpoints").iterdir() if "tmp" in p.name]  # cleaned up
    assert train_losses(run_dir) == reference
    info = json.loads((run_dir / "run.json").read_text())
    assert [r["step"] for r in info["resumes"]] == [expected] and info["status"] == "finished"


def test_killed_before_the_first_checkpoint(tmp_path, tiny_dataset, reference, capsys):
    run_dir = tmp_path / "run"
    assert run_driver(tmp_path, "batch:2", train_args(tiny_dataset, run_dir)).returncode == -signal.SIGKILL
    assert cli.main([*train_args(tiny_dataset, run_dir), "--resume"]) == 1
    assert "no checkpoint" in capsys.readouterr().err
    assert cli.main(train_args(tiny_dataset, run_dir)) == 0  # nothing to lose: a fresh start is allowed
    assert train_losses(run_dir) == reference


def test_sigterm_saves_and_exits_zero(tmp_path, tiny_dataset, reference):
    run_dir = tmp_path / "run"
    r = run_driver(tmp_path, "signal:6:SIGTERM", train_args(tiny_dataset, run_dir))
    assert r.returncode == 0, r.stderr
    assert "stopped at step 6" in r.stdout  # the signal came while the block of steps 4-5 ran
    assert checkpoint.saved_steps(run_dir) == [6]
    assert cli.main([*train_args(tiny_dataset, run_dir), "--resume"]) == 0
    assert train_losses(run_dir) == reference


def test_second_ctrl_c_quits_at_once(tmp_path, tiny_dataset):
    r = run_driver(tmp_path, "signal:6:SIGINT:SIGINT", train_args(tiny_dataset, tmp_path / "run"))
    assert r.returncode == 130 and "interrupted" in r.stderr and "Traceback" not in r.stderr


def test_nonfinite_gradients_skip_the_update():
    opt = optim.make_optimizer(OptimConfig(warmup_iters=0))
    params = {"w": jnp.ones((3, 3))}
    state = opt.init(params)
    bad = {"w": jnp.full((3, 3), jnp.nan)}
    updates, state = opt.update(bad, state, params)
    np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)
    updates, state = opt.update(bad, state, params)
    assert int(optim.nonfinite_count(state)) == 2
    updates, state = opt.update({"w": jnp.ones((3, 3))}, state, params)
    assert int(optim.nonfinite_count(state)) == 0 and int(state.total_notfinite) == 2
    assert np.all(np.asarray(updates["w"]) != 0)


def test_a_diverged_run_stops_and_keeps_its_checkpoint(tmp_path, tiny_dataset, monkeypatch):
    cfg = tiny_config(tiny_dataset, tmp_path / "run", max_iters=8, eval_interval=4, max_nonfinite=3)
    train.train(cfg, **QUIET)
    _, good, _ = checkpoint.load_params(tmp_path / "run", "latest")
    loss_fn = model.loss_fn
    monkeypatch.setattr(model, "loss_fn", lambda *a, **k: loss_fn(*a, **k) * jnp.nan)
    longer = tiny_config(tiny_dataset, tmp_path / "run", max_iters=20, eval_interval=4, max_nonfinite=3)
    # checked after each block of steps (here 4, up to the next evaluation): at least max_nonfinite
    with pytest.raises(train.TrainError, match="[34] steps in a row had non-finite gradients"):
        train.train(longer, resume=True, **QUIET)
    _, kept, meta = checkpoint.load_params(tmp_path / "run", "latest")
    assert meta["step"] == 8
    for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(kept)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "diverged"


def _damage(step_dir):
    for f in step_dir.rglob("*"):
        if f.is_file() and "params" in str(f) and f.stat().st_size > 100:
            f.write_bytes(b"\0" * f.stat().st_size)


def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_dataset, reference, capsys):
    run_dir = tmp_path / "run"
    args = train_args(tiny_dataset, run_dir, max_iters=8)
    assert cli.main([*args, "--train.keep", "2"]) == 0
    _damage(run_dir / "checkpoints" / "8")
    before = {p: p.read_bytes() for p in (run_dir / "checkpoints" / "4").rglob("*") if p.is_file()}

    assert cli.main(["eval", "--out-dir", str(run_dir), "--checkpoint", "latest"]) == 1
    assert "cannot be read" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in (run_dir / "checkpoints" / "4").rglob("*") if p.is_file()}

    assert cli.main([*train_args(tiny_dataset, run_dir), "--train.keep", "2", "--resume"]) == 0
    assert "checkpoint 8 cannot be read" in capsys.readouterr().out
    assert (run_dir / "corrupt" / "checkpoints-8").is_dir()
    assert train_losses(run_dir) == reference


def test_resume_with_another_optimizer_is_refused_and_moves_nothing(tmp_path, tiny_dataset, capsys):
    """Another optimizer's state has another structure: that is the user's request to fix,
    not damage (it used to move every checkpoint to corrupt/ and find none readable)."""
    run_dir = tmp_path / "run"
    assert cli.main(train_args(tiny_dataset, run_dir, max_iters=8)) == 0
    steps = checkpoint.saved_steps(run_dir)
    capsys.readouterr()
    assert cli.main([*train_args(tiny_dataset, run_dir), "--resume", "--optim.optimizer", "muon"]) == 1
    err = capsys.readouterr().err.strip()
    assert "optim.optimizer 'adamw' -> 'muon'" in err and "\n" not in err
    assert checkpoint.saved_steps(run_dir) == steps and not (run_dir / "corrupt").exists()
    # a learning rate is no structure: that resume goes on
    assert cli.main([*train_args(tiny_dataset, run_dir), "--resume", "--optim.learning-rate", "5e-4"]) == 0


def test_full_disk_during_a_save(tmp_path, tiny_dataset, reference, monkeypatch, capsys):
    from orbax.checkpoint._src.path import atomicity

    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def disk_full(self, *args, **kwargs):
        if self._final_path.name == "8":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return await finalize(self, *args, **kwargs)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
    assert cli.main(train_args(tiny_dataset, run_dir)) == 1
    err = capsys.readouterr().err.strip()
    assert "No space left on device" in err and "--resume" in err and "\n" not in err
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
    assert checkpoint.saved_steps(run_dir) == [4]
    assert cli.main([*train_args(tiny_dataset, run_dir), "--resume"]) == 0
    assert train_losses(run_dir) == reference


def test_a_run_dir_is_never_overwritten_silently(tmp_path, tiny_dataset, capsys):
    run_dir = tmp_path / "run"
    args = train_args(tiny_dataset, run_dir, max_iters=4)
    assert cli.main(args) == 0
    assert cli.main(args) == 1
    assert "--force" in capsys.readouterr().err
    assert cli.main([*args, "--model.n-layer", "3", "--resume"]) == 1
    assert "model.n_layer 2 -> 3" in capsys.readouterr().err
    assert cli.main([*args, "--model.n-layer", "3", "--force"]) == 0
    assert f"--force: deleted {run_dir / 'checkpoints'}, {run_dir / 'best'}" in capsys.readouterr().out
    assert checkpoint.run_config(run_dir).model.n_layer == 3


def test_resume_on_a_dataset_with_another_vocabulary(tmp_path, tiny_dataset, shakespeare_text, capsys):
    """The same vocabulary size with one character swapped: only the tokenizer check can see it."""
    from jaxgpt import prepare, sources

    assert "z" in shakespeare_text and "~" not in shakespeare_text
    other = tmp_path / "other.txt"
    other.write_text(shakespeare_text.replace("z", "~"))
    prepare.prepare(sources.resolve_source(str(other)), tmp_path / "other")
    run_dir = tmp_path / "run"
    assert cli.main(train_args(tiny_dataset, run_dir, max_iters=4)) == 0
    assert cli.main([*train_args(tmp_path / "other", run_dir, max_iters=8), "--resume"]) == 1
    assert "another tokenizer or vocabulary" in capsys.readouterr().err


def test_provenance_and_tensorboard(tmp_path, tiny_dataset):
    from tensorboardX.proto import event_pb2

    run_dir = tmp_path / "run"
    assert cli.main(train_args(tiny_dataset, run_dir, max_iters=4)) == 0
    info = json.loads((run_dir / "run.json").read_text())
    assert info["jax"] == jax.__version__ and info["devices"] and info["started"] and info["finished"]
    assert info["data"]["source_sha256"] == json.loads((tiny_dataset / "meta.json").read_text())["source_sha256"]
    tags = {}
    for f in (run_dir / "tensorboard").iterdir():
        raw = f.read_bytes()
        while raw:  # TFRecord framing: length, crc, payload, crc
            n = int.from_bytes(raw[:8], "little")
            event = event_pb2.Event.FromString(raw[12 : 12 + n])
            raw = raw[16 + n :]
            for v in event.summary.value:
                tags.setdefault(v.tag, []).append((event.step, v.simple_value))
    losses = train_losses(run_dir)
    assert [s for s, _ in tags["loss"]] == sorted(losses)
    np.testing.assert_allclose([v for _, v in tags["loss"]], [losses[s] for s in sorted(losses)], rtol=1e-6)
    assert {"val_loss", "lr", "grad_norm", "tokens_per_s"} <= tags.keys()


def snapshot(run_dir) -> dict:
    """Every file of a run directory with its bytes and modification time."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_resume_of_a_finished_run_changes_nothing_then_extends_it(tmp_path, tiny_dataset, reference, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(train_args(tiny_dataset, run_dir, max_iters=8)) == 0
    capsys.readouterr()
    before = snapshot(run_dir)
    assert cli.main([*train_args(tiny_dataset, run_dir, max_iters=8), "--resume"]) == 0
    out, err = capsys.readouterr()
    assert "complete at step 8" in out and "a larger --train.max-iters" in out and not err
    assert snapshot(run_dir) == before
    assert cli.main([*train_args(tiny_dataset, run_dir), "--resume"]) == 0  # 12 iterations: as the reference
    assert train_losses(run_dir) == reference

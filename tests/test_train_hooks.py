"""Opt-in training extras: per-layer statistics, profiler traces, Weights & Biases, lm-eval
tasks during training, and bits per byte beside the val loss. One training run has them
all on (compiling costs more than the run)."""

import dataclasses
import glob
import gzip
import json
import math

import jax
import numpy as np
import optax
import pytest

from jaxgpt import checkpoint, cli, data, hooks, model, train
from jaxgpt.config import Config, ConfigError, EvalConfig

from test_train import tiny_config

QUIET = {"log": lambda s: None}


def records(run_dir) -> list[dict]:
    return [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]


def with_train(cfg, **kw):
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **kw))


def write_rolling_task(folder, text: str, cache) -> str:
    folder.mkdir()
    docs = [{"text": text[i * 300 : i * 300 + 200 + 50 * i]} for i in range(3)]
    (folder / "roll.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "roll.yaml").write_text(
        "task: shakespeare_roll\ndataset_path: json\ntest_split: test\n"
        f"dataset_kwargs:\n  cache_dir: {cache}\n  data_files:\n    test: {folder / 'roll.jsonl'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n  - metric: word_perplexity\n")
    return str(folder)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dataset, shakespeare_text):
    """(run dir, config, log lines, what reached wandb) of a 4-step run with every extra on."""
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("lm_eval")
    tmp = tmp_path_factory.mktemp("hooks")
    tasks = write_rolling_task(tmp / "tasks", shakespeare_text, tmp / "cache")
    cfg = tiny_config(tiny_dataset, tmp / "run", max_iters=4, eval_interval=1, keep=5, layer_stats=True,
                      profile_steps="2:4", wandb_project="jaxgpt-test", compute_dtype="bfloat16", grad_accum=2)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, warmup_iters=0),
                              eval=EvalConfig(tasks=("shakespeare_roll",), every=2, include_path=tasks))
    logs, logged = [], []
    log = wandb.sdk.wandb_run.Run.log
    with pytest.MonkeyPatch.context() as mp:  # see what reaches wandb (the real Run.log runs too)
        mp.setattr(wandb.sdk.wandb_run.Run, "log",
                   lambda self, d, step=None, **kw: (logged.append((step, d)), log(self, d, step=step, **kw))[1])
        train.train(cfg, log=logs.append, hooks=hooks.from_config(cfg))
    return tmp / "run", cfg, logs, logged


def test_layer_stats_agree_with_the_step(run):
    run_dir, cfg, _, _ = run
    rec = next(r for r in records(run_dir) if r["step"] == 0 and "loss" in r)
    layers = ["wte", "wpe", "h0", "h1", "ln_f"]
    assert {f"{n}.{s}" for n in layers for s in ("param_norm", "grad_norm", "update_ratio")} <= set(rec)

    mcfg = train.with_data_vocab(cfg, data.open_dataset(cfg.data.dir)).model
    p0 = hooks.layer_groups(model.init_params(mcfg, jax.random.key(cfg.train.seed)))
    mngr = checkpoint.managers(run_dir, keep=5)["latest"]
    params, _, _ = checkpoint.restore(mngr, 1, model.abstract_params(mcfg))
    p1 = hooks.layer_groups(params)  # after step 0's update
    # the step's own global gradient norm is the norm of the layers' norms
    assert math.sqrt(sum(rec[f"{n}.grad_norm"] ** 2 for n in layers)) == pytest.approx(rec["grad_norm"], rel=1e-5)
    for n in layers:
        assert rec[f"{n}.param_norm"] == pytest.approx(float(optax.tree.norm(p0[n])), rel=1e-5)
        change = float(optax.tree.norm(jax.tree.map(lambda a, b: a - b, p1[n], p0[n])))
        assert rec[f"{n}.update_ratio"] == pytest.approx(change / rec[f"{n}.param_norm"], rel=1e-3)
        assert rec[f"{n}.update_ratio"] > 0


def test_profile_steps_write_a_perfetto_trace(run):
    run_dir, _, logs, _ = run
    traces = glob.glob(str(run_dir / "profile" / "**" / "perfetto_trace.json.gz"), recursive=True)
    assert len(traces) == 1 and "profile of steps 2-3 written to" in "\n".join(logs)
    events = json.loads(gzip.decompress(open(traces[0], "rb").read()))
    assert any(e.get("ph") == "X" for e in events["traceEvents"])  # timed kernel events
    with pytest.raises(ConfigError, match="give START:END with START < END"):
        hooks.step_range("3:1")


def test_wandb_offline_gets_the_metrics(run):
    run_dir, _, _, logged = run
    assert glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    for rec in records(run_dir):
        want = {k: v for k, v in rec.items() if k != "step" and v is not None}
        assert (rec["step"], want) in logged


def test_wandb_without_network_falls_back_to_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(hooks, "WANDB_HOST", ("127.0.0.1", 9))  # nothing listens there
    logs = []
    hook = hooks.Wandb("p", tmp_path)
    hook.begin(Config(), None, 0, logs.append)
    hook.record({"step": 0, "loss": 1.5})
    hook.end("finished")
    notes = [s for s in logs if s.startswith("wandb:")]
    assert len(notes) == 1 and "unreachable, logging offline" in notes[0] and "\n" not in notes[0]
    assert glob.glob(str(tmp_path / "wandb" / "offline-run-*"))


def test_bits_per_byte_in_the_log_and_eval(run, capsys):
    run_dir, cfg, logs, _ = run
    meta = json.loads((run_dir / "data_meta.json").read_text())["splits"]["val"]
    evals = [r for r in records(run_dir) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 1, 2, 3, 4]
    for rec in evals:
        assert rec["val_bpb"] == pytest.approx(rec["val_loss"] / math.log(2) * meta["tokens"] / meta["bytes"])
    assert any(" bits per byte)" in s for s in logs)
    assert cli.main(["eval", "--out-dir", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2) * meta["tokens"] / meta["bytes"])


def test_lm_eval_tasks_during_training(run):
    from jaxgpt import lm_eval_model

    run_dir, cfg, _, _ = run
    key = "shakespeare_roll/bits_per_byte,none"
    logged = {r["step"]: r for r in records(run_dir) if key in r}
    assert sorted(logged) == [2, 4] and logged[2][key] != logged[4][key]
    # the same task on the step-4 checkpoint, evaluated afresh from the run directory
    lm = lm_eval_model.JaxGPTLM(pretrained=str(run_dir), checkpoint="latest", batch_size=3)
    fresh = lm_eval_model.evaluate(lm, ["shakespeare_roll"], include_path=cfg.eval.include_path, bootstrap_iters=0)
    for metric in ("bits_per_byte,none", "word_perplexity,none"):
        want = fresh["results"]["shakespeare_roll"][metric]
        assert np.isfinite(want) and logged[4][f"shakespeare_roll/{metric}"] == pytest.approx(want, rel=1e-6)


def test_the_loop_imports_no_extra():
    """Extras come in as hooks: importing the loop pulls in neither lm-eval nor wandb."""
    import subprocess
    import sys

    code = "import sys, jaxgpt.train; print([m for m in ('lm_eval', 'wandb', 'jaxgpt.lm_eval_model') if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr

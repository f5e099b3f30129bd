"""The command line: an end-to-end run in a subprocess, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest

from jaxgpt import cli

TINY = ["--model.n-layer", "2", "--model.n-head", "2", "--model.n-embd", "32", "--model.block-size", "32",
        "--data.batch-size", "4", "--train.max-iters", "6", "--train.eval-interval", "3",
        "--train.eval-iters", "2", "--train.log-interval", "2"]


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "jaxgpt.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_prepare_train_sample_eval(tmp_path, shakespeare_text):
    (tmp_path / "corpus.txt").write_text(shakespeare_text)
    r = run("prepare", "corpus.txt", "--out", "data", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "meta.json").is_file()

    r = run("train", "shakespeare-char-cpu", "--data-dir", "data", "--out-dir", "run", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout and "iter 4: loss" in r.stdout
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "val_loss" in r] == [0, 3, 6]

    r = run("sample", "--out-dir", "run", "--prompt", "ROMEO:", "--num-samples", "2", "--max-new-tokens", "20",
            "--temperature", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert_greedy(tmp_path / "run", "ROMEO:", r.stdout, n_samples=2, n_new=20)
    r = run("sample", "--out-dir", "run", "--prompt", "ROMEO:", "--num-samples", "1", "--max-new-tokens", "20",
            "--temperature", "0", "--dtype", "bfloat16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert_greedy(tmp_path / "run", "ROMEO:", r.stdout, n_samples=1, n_new=20, dtype="bfloat16")

    r = run("eval", "--out-dir", "run", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["tokens"] == len(shakespeare_text) - int(0.9 * len(shakespeare_text)) - 1
    assert abs(result["perplexity"] - 2.718281828 ** result["loss"]) < 1e-6 * result["perplexity"]

    r = run("train", "shakespeare-char-cpu", "--data-dir", "data", "--out-dir", "run", *TINY, cwd=tmp_path)
    assert r.returncode == 1 and "--resume" in r.stderr  # never overwrites a run silently


def assert_greedy(run_dir, prompt: str, stdout: str, n_samples: int, n_new: int, dtype: str = "float32"):
    """Every sample printed is the prompt and `n_new` characters, each the argmax of the run's
    best checkpoint's full forward (its params in `dtype`) over the text before it (within
    float32 rounding of a tie)."""
    import jax
    import numpy as np

    from jaxgpt import checkpoint, load, model

    cfg, params, _ = checkpoint.load_params(run_dir, "best")
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    tok = load.load_model(run_dir)[2]
    samples = stdout.removesuffix("\n").split("\n" + "-" * 40 + "\n")
    assert len(samples) == n_samples and len(set(samples)) == 1, samples
    ids = tok.encode(samples[0])
    assert samples[0].startswith(prompt) and len(ids) == len(prompt) + n_new
    logits_TV = np.asarray(model.forward(params, np.asarray([ids], np.int32), cfg.model))[0]
    for t in range(len(prompt), len(ids)):
        assert logits_TV[t - 1, ids[t]] >= logits_TV[t - 1].max() - 1e-4, (t, samples[0])


def one_line_error(capsys, argv) -> str:
    assert cli.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("error: ")
    return err


@pytest.mark.parametrize("argv, expected", [
    (["train", "--model.n-layr", "3"], "did you mean --model.n-layer"),
    (["train", "--model.n-layer", "four"], "--model.n-layer"),
    (["train", "--train.compute-dtype", "fp16"], "Expected one of ('auto', 'float32', 'bfloat16')"),
    (["train", "shakespeare-char-cp"], "did you mean 'shakespeare-char-cpu'"),
    (["train", "--data-dir", "/nonexistent/data"], "jaxgpt prepare"),
    (["sample"], "--out-dir"),
    (["eval", "--out-dir", "/nonexistent/run"], "not a jaxgpt run directory"),
    (["prepare", "/nonexistent/corpus.txt"], "does not exist"),
    (["prepare", "shakespeare", "--encoding", "klingon"], "klingon"),
    (["prepare", "shakespeare", "--workers", "0"], "--workers must be at least 1, got 0"),
])
def test_user_errors_are_one_line(capsys, argv, expected):
    assert expected in one_line_error(capsys, argv)


def test_unknown_key_in_config_file(capsys, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[optim]\nlearning_rat = 0.1\n")
    assert "'optim.learning_rat' (did you mean 'learning_rate'?)" in one_line_error(capsys, ["train", str(path)])


def test_debug_shows_the_traceback(tmp_path):
    r = run("train", "--data-dir", "nowhere", "--debug", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_bad_datasets_are_named(capsys, tmp_path):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "meta.json").write_text("{not json")
    assert "is not a jaxgpt meta.json" in one_line_error(capsys, ["train", "--data-dir", str(garbage)])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "holds no text" in one_line_error(capsys, ["prepare", str(empty), "--out", str(tmp_path / "e")])
    small = tmp_path / "small.txt"
    small.write_text("to be or not to be\n" * 3)
    assert cli.main(["prepare", str(small), "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    err = one_line_error(capsys, ["train", "--data-dir", str(tmp_path / "s"), "--out-dir", str(tmp_path / "r")])
    assert "fewer than block_size + 1" in err


def test_info_counts_without_allocating(capsys):
    assert cli.main(["info", "gpt2-124m"]) == 0
    out = capsys.readouterr().out
    biases = 12 * (3 * 768 + 768 + 4 * 768 + 768 + 2 * 768) + 768  # the preset has bias = false
    n = 124_439_808 - biases  # GPT-2 small's published count
    assert f"parameters: {n:,} ({n - 1024 * 768:,} without the position table)" in out
    from jaxgpt import config, model

    cfg = config.load("gpt2-124m").model
    assert model.flops_per_token(cfg) == 6 * (n - 1024 * 768) + 12 * 12 * 1024 * 768
    assert f"{model.flops_per_token(cfg):.3e}" in out


def test_plot_writes_a_png_of_the_runs(tmp_path, tiny_dataset):
    import shutil

    import matplotlib.image

    args = ["train", "shakespeare-char-cpu", "--data-dir", str(tiny_dataset), "--out-dir", str(tmp_path / "a"), *TINY]
    assert cli.main(args) == 0
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # a second run to draw beside the first
    out = tmp_path / "loss.png"
    assert cli.main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (450, 1200)
    assert image[..., :3].std() > 0.05  # lines drawn, not a blank canvas

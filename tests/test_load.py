"""One loader for every command that reads a model: a run directory, an HF directory or a Hub name."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxgpt import checkpoint, cli, data, hf, load, model
from jaxgpt import tokenizer as tokenizer_lib
from jaxgpt.config import Config, DataConfig, GPTConfig

TINY = GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=65, dropout=0.0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_dataset):
    """A run directory with one checkpoint at step 3, written as training writes it."""
    ds = data.open_dataset(tiny_dataset)
    cfg = Config(model=GPTConfig(**{**TINY.__dict__, "vocab_size": ds.vocab_size}), data=DataConfig(dir=str(ds.dir)))
    run = tmp_path_factory.mktemp("run")
    checkpoint.write_run_files(run, cfg, ds.meta, ds.dir)
    params = model.init_params(cfg.model, jax.random.key(1))
    checkpoint.save(checkpoint.managers(run, 2)["latest"], 3, {"step": 3, "val_loss": None, "best_val_loss": 9.0},
                    params)
    return run, params


def leaves_equal(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_a_run_directory_gives_its_checkpoint_and_its_datas_tokenizer(run_dir, tiny_dataset, shakespeare_text):
    """The model saved (config, tree and every array), and a tokenizer that gives the ids the
    dataset holds: char ids are the ranks of the characters (nanoGPT's stoi)."""
    run, params = run_dir
    cfg, loaded, tok = load.load_model(run)
    assert cfg == checkpoint.run_config(run).model and cfg.vocab_size == len(set(shakespeare_text))
    assert jax.tree.structure(loaded) == jax.tree.structure(params) and leaves_equal(loaded, params)
    val = shakespeare_text[int(0.9 * len(shakespeare_text)):]
    assert tok.encode(val) == np.fromfile(tiny_dataset / "val.bin", np.uint16).tolist()
    stoi = {c: i for i, c in enumerate(sorted(set(shakespeare_text)))}
    assert tok.encode("ROMEO:\nO") == [stoi[c] for c in "ROMEO:\nO"] and tok.decode(tok.encode(val)) == val


def test_an_hf_directory_gives_gpt2s_tokenizer_only_where_its_vocabulary_holds_it(tmp_path):
    params = model.init_params(TINY, jax.random.key(0))
    hf.save_hf(TINY, params, tmp_path / "char")
    cfg, loaded, tok = load.load_model(tmp_path / "char", need_tokenizer=False)
    assert cfg == TINY and tok is None and leaves_equal(loaded, params)
    with pytest.raises(hf.HFError, match="vocabulary of 65, not GPT-2's"):
        load.load_model(tmp_path / "char")

    gpt2_shape = GPTConfig(**{**TINY.__dict__, "vocab_size": 50257})
    hf.save_hf(gpt2_shape, model.init_params(gpt2_shape, jax.random.key(0)), tmp_path / "bpe")
    _, _, tok = load.load_model(tmp_path / "bpe")
    assert tok.encode("Hello world") == [15496, 995]


@pytest.mark.parametrize("source, expected", [
    ("empty-dir", "neither a jaxgpt run directory (config.toml) nor a Hugging Face checkpoint"),
    ("gpt2-not-cached-here", "no directory 'gpt2-not-cached-here'"),  # a Hub name: the tests run offline
    ("./no/such/dir", "no directory './no/such/dir'"),
])
def test_what_is_not_a_model_is_one_line(tmp_path, monkeypatch, capsys, source, expected):
    (tmp_path / "empty-dir").mkdir()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sample", "--out-dir", source, "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and expected in err, err


def test_sample_convert_and_lm_eval_all_load_through_load_model(tmp_path, monkeypatch, run_dir):
    run, _ = run_dir
    calls = []
    real = load.load_model
    monkeypatch.setattr(load, "load_model", lambda *a, **k: calls.append(str(a[0])) or real(*a, **k))
    assert cli.main(["sample", "--out-dir", str(run), "--max-new-tokens", "2", "--num-samples", "1"]) == 0
    assert cli.main(["convert", str(run), str(tmp_path / "hf")]) == 0
    assert cli.main(["sample", "--init-from", str(tmp_path / "hf"), "--max-new-tokens", "1"]) == 1  # char vocab
    lm_eval_model = pytest.importorskip("jaxgpt.lm_eval_model")
    lm_eval_model.JaxGPTLM(pretrained=str(run), batch_size=1)
    assert calls == [str(run), str(run), str(tmp_path / "hf"), str(run)]


def test_import_and_help_do_not_import_jax():
    code = ("import sys, jaxgpt; from jaxgpt import cli; assert cli.main(['--help']) == 0; "
            "print(sorted(m for m in ('jax', 'tiktoken', 'lm_eval', 'orbax', 'optax') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    code = ("import inspect, jaxgpt, jaxgpt.generate, jaxgpt.model; "
            "print(jaxgpt.GPTConfig().n_layer, *(inspect.isfunction(f) for f in (jaxgpt.generate, jaxgpt.forward)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.split() == ["12", "True", "True"], r.stderr  # the submodule never hides the function


def test_an_hf_llama_gives_gpt2s_tokenizer_only_beside_gpt2s_bpe_files(tmp_path):
    llama = GPTConfig(**{**TINY.__dict__, "pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False})
    hf.save_hf(llama, model.init_params(llama, jax.random.key(0)), tmp_path / "char")
    cfg, _, tok = load.load_model(tmp_path / "char", need_tokenizer=False)
    assert cfg.pos == "rope" and tok is None
    with pytest.raises(hf.HFError, match="is a Llama checkpoint whose tokenizer jaxgpt does not support"):
        load.load_model(tmp_path / "char")

    bpe = GPTConfig(**{**llama.__dict__, "vocab_size": 50257})
    params = model.init_params(bpe, jax.random.key(0))
    hf.save_hf(bpe, params, tmp_path / "bare")  # a Llama vocabulary of that size need not be GPT-2's
    assert load.load_model(tmp_path / "bare", need_tokenizer=False)[2] is None
    hf.save_hf(bpe, params, tmp_path / "bpe", tokenizer=tokenizer_lib.get_tokenizer("gpt2"))
    assert load.load_model(tmp_path / "bpe")[2].encode("Hello world") == [15496, 995]


def _bpe_dataset(text: str, out):
    from jaxgpt import prepare, sources

    (out.parent / f"{out.name}.txt").write_text(text)
    prepare.prepare(sources.resolve_source(str(out.parent / f"{out.name}.txt")), out, "bpe:300")
    return data.open_dataset(out)


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, shakespeare_text):
    """Two bpe:300 datasets of different text (the same vocabulary size, other merges) under
    WORK/a and WORK/b, and a run trained on WORK/a, written as training writes it, that names its
    data by the relative path "data" (as `--data-dir data` from WORK/a's parent would)."""
    pytest.importorskip("tokenizers")
    work = tmp_path_factory.mktemp("bpe")
    a, b = (_bpe_dataset(shakespeare_text[i:i + 20_000], work / name) for i, name in ((0, "a"), (20_000, "b")))
    assert a.vocab_size == b.vocab_size and (a.dir / "tokenizer.json").read_bytes() != (b.dir / "tokenizer.json").read_bytes()
    cfg = Config(model=GPTConfig(**{**TINY.__dict__, "vocab_size": a.vocab_size}), data=DataConfig(dir="data"))
    run = work / "run"
    checkpoint.write_run_files(run, cfg, a.meta, a.dir)
    checkpoint.save(checkpoint.managers(run, 2)["latest"], 3, {"step": 3, "val_loss": None, "best_val_loss": 9.0},
                    model.init_params(cfg.model, jax.random.key(1)))
    return work, a, b, cfg


def test_a_copied_run_directory_samples_with_its_own_tokenizer(tmp_path, monkeypatch, bpe_run):
    work, a, b, _ = bpe_run
    import shutil

    shutil.copytree(work / "run", tmp_path / "moved")
    (tmp_path / "data").symlink_to(b.dir)  # where the run's relative data dir now points: other merges
    monkeypatch.chdir(tmp_path)
    _, _, tok = load.load_model(tmp_path / "moved")
    text = "ROMEO: what light through yonder window breaks"
    assert tok.encode(text) == a.tokenizer().encode(text) != b.tokenizer().encode(text)
    shutil.copyfile(b.dir / "tokenizer.json", tmp_path / "moved" / "tokenizer.json")
    with pytest.raises(tokenizer_lib.TokenizerError, match="does not match the sha256"):
        load.load_model(tmp_path / "moved")


def test_tokenizer_meta_records_the_sha256_of_what_defines_it(bpe_run):
    import hashlib

    _, a, _, _ = bpe_run
    assert a.meta["tokenizer"]["sha256"] == hashlib.sha256((a.dir / "tokenizer.json").read_bytes()).hexdigest()
    char = tokenizer_lib.CharTokenizer("abc\n")
    assert char.meta()["sha256"] == hashlib.sha256("abc\n".encode()).hexdigest()


def test_resume_refuses_a_dataset_with_other_merges(tmp_path, bpe_run):
    import dataclasses

    from jaxgpt import train
    from jaxgpt.config import TrainConfig

    work, a, b, cfg = bpe_run
    import shutil

    shutil.copytree(work / "run", tmp_path / "run")
    cfg = dataclasses.replace(cfg, data=DataConfig(dir=str(b.dir), batch_size=2),
                              train=TrainConfig(out_dir=str(tmp_path / "run"), max_iters=3))
    with pytest.raises(train.TrainError, match="another tokenizer"):
        train.train(cfg, resume=True, log=lambda s: None)
    with pytest.raises(data.DataError, match="uses another tokenizer than the run"):  # nor does eval take it
        cli.cmd_eval(["--out-dir", str(tmp_path / "run"), "--data-dir", str(b.dir), "--checkpoint", "latest"])


def test_rewriting_the_run_files_is_atomic(tmp_path, monkeypatch, run_dir, tiny_dataset):
    """A resume rewrites config.toml and data_meta.json: a stop in the middle of that keeps
    the earlier files whole, so the run still loads."""
    import shutil
    from pathlib import Path

    run, params = run_dir
    shutil.copytree(run, tmp_path / "run")
    cfg, ds = checkpoint.run_config(run), data.open_dataset(tiny_dataset)
    write_text = Path.write_text

    def torn(self, text, *args, **kwargs):
        write_text(self, text[:10], *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_run_files(tmp_path / "run", cfg, ds.meta, ds.dir)
    monkeypatch.setattr(Path, "write_text", write_text)
    assert checkpoint.run_config(tmp_path / "run") == cfg and checkpoint.data_meta(tmp_path / "run") == ds.meta
    assert leaves_equal(load.load_model(tmp_path / "run")[1], params)

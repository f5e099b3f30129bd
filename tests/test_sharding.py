"""Sharded training on 8 fake CPU devices equals one device; precision and remat.

The 8-device runs happen in a subprocess (this file run as a script with XLA_FLAGS set):
the rest of the suite keeps its one device.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import model, step, train
from jaxgpt.config import Config, ConfigError, DataConfig, GPTConfig, MeshConfig, OptimConfig, TrainConfig

CFG = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=65, dropout=0.1)
MESHES = {"data8": MeshConfig(8, 1, 1), "fsdp8": MeshConfig(1, 8, 1), "fsdp4_tensor2": MeshConfig(1, 4, 2),
          "data2_fsdp2_tensor2": MeshConfig(2, 2, 2)}


def run_config(data_dir, out_dir, mesh=MeshConfig(), max_iters=10) -> Config:
    return Config(
        model=GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=65, dropout=0.1, bias=True),
        data=DataConfig(dir=str(data_dir), batch_size=8),
        optim=OptimConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=3, lr_decay_iters=10),
        train=TrainConfig(max_iters=max_iters, eval_interval=5, eval_iters=1, log_interval=1, out_dir=str(out_dir),
                          compute_dtype="float32"),
        mesh=mesh,
    )


def modern_config(data_dir, out_dir, mesh=MeshConfig()) -> Config:
    """run_config with the modern switches and Muon, whose Newton-Schulz runs on fsdp-sharded matrices."""
    cfg = run_config(data_dir, out_dir, mesh)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, pos="rope", norm="rmsnorm", qk_norm=True, mlp="swiglu", n_head=4,
                                  n_kv_head=2, tie_embeddings=False),
        optim=dataclasses.replace(cfg.optim, optimizer="muon", muon_learning_rate=0.02),
    )


def losses(run_dir) -> list[float]:
    records = [json.loads(s) for s in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted(records, key=lambda r: r["step"]) if "loss" in r]


def eight_device_runs(data_dir: str, out_dir: str) -> dict:
    """Runs in the 8-device subprocess: ten steps under each mesh, bytes per device, and
    a run checkpointed under fsdp=8 at step 5 and resumed under data=2×fsdp=2×tensor=2."""
    from jaxgpt import optim, sharding

    assert jax.device_count() == 8
    out = {"losses": {}}
    for name, mesh in MESHES.items():
        train.train(run_config(data_dir, Path(out_dir) / name, mesh), log=lambda s: None)
        out["losses"][name] = losses(Path(out_dir) / name)

    cfg = run_config(data_dir, Path(out_dir) / "unused", MESHES["fsdp8"])
    mesh, opt = sharding.make_mesh(cfg.mesh), optim.make_optimizer(cfg.optim)
    sh = step.shardings(cfg, opt, mesh)
    params = jax.jit(model.init_params, static_argnums=0, out_shardings=sh["params"])(cfg.model, jax.random.key(0))
    opt_state = jax.jit(opt.init, out_shardings=sh["opt_state"])(params)
    for what, tree in (("params", params), ("opt_state", opt_state)):
        matrices = [leaf for leaf in jax.tree.leaves(tree) if leaf.ndim >= 2]
        per_device = {}
        for shard in (shard for leaf in matrices for shard in leaf.addressable_shards):
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
        out[what] = {"total": sum(leaf.nbytes for leaf in matrices), "per_device": list(per_device.values())}

    train.train(modern_config(data_dir, Path(out_dir) / "muon_fsdp8", MESHES["fsdp8"]), log=lambda s: None)
    out["muon_fsdp8"] = losses(Path(out_dir) / "muon_fsdp8")

    resumed = Path(out_dir) / "resumed"
    train.train(run_config(data_dir, resumed, MESHES["fsdp8"], max_iters=5), log=lambda s: None)
    train.train(run_config(data_dir, resumed, MESHES["data2_fsdp2_tensor2"]), resume=True, log=lambda s: None)
    out["resumed"] = losses(resumed)
    return out


@pytest.fixture(scope="module")
def one_device(tiny_dataset, tmp_path_factory) -> list[float]:
    run = tmp_path_factory.mktemp("one_device")
    train.train(run_config(tiny_dataset, run), log=lambda s: None)
    return losses(run)


@pytest.fixture(scope="module")
def eight_devices(tiny_dataset, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("eight_devices")
    # Low LLVM optimisation compiles the 8-way programs ~40% faster; the math is the same.
    flags = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    env.pop("JAX_NUM_CPU_DEVICES", None)  # conftest's 1 would override the flag's 8
    proc = subprocess.run([sys.executable, __file__, str(tiny_dataset), str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("mesh", list(MESHES))
def test_sharded_training_matches_one_device(mesh, one_device, eight_devices):
    got = eight_devices["losses"][mesh]
    assert len(got) == len(one_device) == 10
    np.testing.assert_allclose(got[0], one_device[0], rtol=1e-5)
    np.testing.assert_allclose(got, one_device, rtol=1e-4)


def test_muon_under_fsdp_matches_one_device(tiny_dataset, tmp_path, eight_devices):
    train.train(modern_config(tiny_dataset, tmp_path / "muon"), log=lambda s: None)
    want = losses(tmp_path / "muon")
    assert len(want) == 10 and want[-1] < want[0]
    np.testing.assert_allclose(eight_devices["muon_fsdp8"], want, rtol=1e-4)


def test_fsdp_shards_params_and_optimizer_state(eight_devices):
    for what in ("params", "opt_state"):  # matrices; vectors (LayerNorm, biases) stay replicated
        total, per_device = eight_devices[what]["total"], eight_devices[what]["per_device"]
        assert per_device == [total // 8] * 8, (what, total, per_device)


def test_checkpoint_from_one_mesh_resumes_on_another(one_device, eight_devices):
    np.testing.assert_allclose(eight_devices["resumed"], one_device, rtol=1e-4)


def test_mesh_sizes():
    from jaxgpt import sharding

    assert sharding.mesh_shape(MeshConfig(-1, 2, 2), 8) == (2, 2, 2)
    assert sharding.mesh_shape(MeshConfig(1, -1, 4), 8) == (1, 2, 4)
    with pytest.raises(ConfigError, match=r"mesh data=2, fsdp=2, tensor=1 needs 4 devices but there are 8"):
        sharding.mesh_shape(MeshConfig(2, 2, 1), 8)
    with pytest.raises(ConfigError, match="8 devices are not divisible by 3"):
        sharding.mesh_shape(MeshConfig(-1, 3, 1), 8)
    with pytest.raises(ConfigError, match="at most one -1"):
        sharding.mesh_shape(MeshConfig(-1, -1, 1), 8)


def test_bad_mesh_for_this_machine_is_one_line(tiny_dataset, tmp_path):
    cfg = run_config(tiny_dataset, tmp_path / "run", MeshConfig(1, 2, 1))
    with pytest.raises(ConfigError, match="needs 2 devices but there are 1"):
        train.train(cfg, log=lambda s: None)


def _tokens(shape=(2, 16)):
    return jax.random.randint(jax.random.key(1), shape, 0, CFG.vocab_size)


def test_bfloat16_compute_is_close_to_float32():
    cfg = dataclasses.replace(CFG, dropout=0.0)
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    bf16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    tokens = _tokens()
    forward = jax.jit(model.forward, static_argnums=2)
    want, got = np.asarray(forward(params, tokens, cfg)), forward(bf16, tokens, cfg)
    assert got.dtype == jnp.float32  # logits stay float32
    np.testing.assert_allclose(np.asarray(got), want, atol=0.02 * np.abs(want).max())
    assert not np.array_equal(np.asarray(got), want)  # bfloat16 really ran


def test_remat_gives_the_same_grads():
    params = jax.jit(model.init_params, static_argnums=0)(CFG, jax.random.key(0))
    tokens, key = _tokens(), jax.random.key(5)  # with dropout: the masks must be recomputed identically
    grad = jax.jit(jax.grad(model.loss_fn), static_argnums=3, static_argnames="remat")
    assert "remat" in str(grad.trace(params, tokens, tokens, CFG, key, remat=True).jaxpr)  # jax.checkpoint is applied
    plain = grad(params, tokens, tokens, CFG, key)
    remat = grad(params, tokens, tokens, CFG, key, remat=True)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)  # same math; fusion may round differently

if __name__ == "__main__":
    result = eight_device_runs(sys.argv[1], sys.argv[2])
    (Path(sys.argv[2]) / "result.json").write_text(json.dumps(result))


def test_tensor_parallel_rules_reach_the_params():
    """Which param dims each axis of a (data 1, fsdp 4, tensor 2) mesh splits; a dim the
    axis does not divide (an odd vocabulary) stays whole."""
    from jax.sharding import AbstractMesh
    from jax.sharding import PartitionSpec as P

    from jaxgpt import sharding

    mesh = AbstractMesh((1, 4, 2), sharding.AXES)
    for vocab, wte in ((64, P("tensor", "fsdp")), (65, P(None, "fsdp"))):
        cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=vocab, bias=True)
        specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(mesh, model.abstract_params(cfg)))
        block = specs["h"][0]
        assert specs["wte"] == wte and specs["wpe"] == P(None, "fsdp")
        assert block["attn"]["c_attn"]["kernel"] == block["mlp"]["c_fc"]["kernel"] == P("fsdp", "tensor")
        assert block["attn"]["c_proj"]["kernel"] == block["mlp"]["c_proj"]["kernel"] == P("tensor", "fsdp")
        assert block["attn"]["c_attn"]["bias"] == P("tensor") and block["ln_1"]["scale"] == P()


def test_cpu_devices_per_core_train_as_one_device(tiny_dataset, tmp_path, capsys):
    """mesh.cpu_devices = 0 (the CPU preset's) splits the cores into devices: the same losses;
    the run samples and evaluates on one device as the run trained on one does."""
    from jaxgpt import cli

    args = ["train", "shakespeare-char-cpu", "--data-dir", str(tiny_dataset), "--model.n-layer", "1",
            "--model.n-head", "2", "--model.n-embd", "32", "--model.block-size", "16", "--data.batch-size", "4",
            "--train.max-iters", "6", "--train.eval-interval", "3", "--train.eval-iters", "1",
            "--train.log-interval", "1", "--mesh.cpu-devices", "0"]
    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}
    proc = subprocess.run([sys.executable, "-m", "jaxgpt.cli", *args, "--out-dir", str(tmp_path / "split")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cores = len(os.sched_getaffinity(0))
    expected = max(d for d in range(1, cores + 1) if 4 % d == 0)
    assert len(json.loads((tmp_path / "split" / "run.json").read_text())["devices"]) == expected
    assert cli.main([*args, "--out-dir", str(tmp_path / "one")]) == 0  # this process has its one device
    np.testing.assert_allclose(losses(tmp_path / "split"), losses(tmp_path / "one"), rtol=1e-5)
    # a run saved from several devices samples and evaluates on this process's one, as the one-device run
    outputs = {}
    for run in ("split", "one"):
        capsys.readouterr()
        assert cli.main(["sample", "--out-dir", str(tmp_path / run), "--max-new-tokens", "8", "--num-samples", "1",
                         "--temperature", "0"]) == 0
        assert cli.main(["eval", "--out-dir", str(tmp_path / run), "--json"]) == 0
        text, result = capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)
        outputs[run] = (text, json.loads(result)["loss"])
    assert outputs["split"][0] == outputs["one"][0] and len(outputs["one"][0]) == 1 + 8  # "\n" and 8 characters
    np.testing.assert_allclose(outputs["split"][1], outputs["one"][1], rtol=1e-5)

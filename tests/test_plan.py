"""jaxgpt plan: train's step compiled for TPU chips this machine lacks (libtpu), its memory per
device against a count by hand, the verdict of a step too big for a chip, and one-line errors."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxgpt import cli, config, plan

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install 'jaxgpt[tpu]')")

# 2 layers, width 64 (MLP 256), context 32, vocabulary 96, no biases: every dim splits in two.
TINY = """
[model]
n_layer = 2
n_head = 2
n_embd = 64
block_size = 32
vocab_size = 96
bias = false
[data]
batch_size = 8
[train]
steps_per_call = 1
"""


@pytest.fixture
def tiny(tmp_path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["plan", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name, platform, topology, chips", [
    ("v5e-8", "tpu", "v5e:2x4", 8),  # Cloud TPU's shapes: v5e and v6e count chips,
    ("v5litepod-16", "tpu", "v5e:4x4", 16),
    ("v6e-256", "tpu", "v6e:16x16", 256),
    ("v5p-8", "tpu", "v5p:2x2x1", 4),  # v5p counts TensorCores, two a chip
    ("v5p-64", "tpu", "v5p:2x4x4", 32),
    ("v5p-128", "tpu", "v5p:4x4x4", 64),
    ("V5E:2x2", "tpu", "v5e:2x2", 4),
    ("8xh100", "cuda", "1x1x8", 8),
    ("16xH100", "cuda", "1x2x8", 16),
])
def test_topology_names(name, platform, topology, chips):
    assert plan.parse_target(name) == plan.Target(name, platform, topology, chips)


@pytest.mark.parametrize("argv, message", [
    (["--topology", "v9-8"], "--topology v9-8: unknown topology; give one like v5e-8"),
    (["--topology", "v5p-12"], "--topology v5p-12: v5p slices come in powers of two"),
    (["--topology", "v5e-4", "--mesh.tensor", "3"], "4 devices are not divisible by 3"),
    (["--topology", "v5e-8", "--mesh.data", "2", "--mesh.fsdp", "2"], "needs 4 devices but there are 8"),
])
def test_bad_targets_are_one_line(capsys, tiny, argv, message):
    code, out, err = run_cli(capsys, tiny, *argv)
    assert code == 1 and out == ""
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_missing_libtpu_is_one_line(capsys, tiny, monkeypatch):
    from jax.experimental import topologies

    def without_libtpu(platform, **kwargs):  # what JAX raises where libtpu is not installed
        raise RuntimeError(f"Unable to initialize backend '{platform}': TPU support not installed")

    monkeypatch.setattr(topologies, "get_topology_desc", without_libtpu)
    code, _, err = run_cli(capsys, tiny, "--topology", "v5e-4")
    assert code == 1 and err.strip() == "error: --topology v5e-4 needs libtpu: pip install 'jaxgpt[tpu]'"


@needs_libtpu
def test_tiny_model_on_v5e_2x2(tiny):
    """Per-device params and optimizer state equal the sharded shapes counted by hand; the
    compile holds the collectives fsdp and tensor parallelism need; XLA's FLOPs are near the
    model's count."""
    cfg = config.load(str(tiny))
    cfg = dataclasses.replace(cfg, mesh=config.MeshConfig(data=1, fsdp=2, tensor=2))
    p = plan.plan(cfg, "v5e:2x2")
    assert p["device_kind"] == "TPU v5 lite" and p["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    # Floats a device holds, by sharding.RULES with fsdp = tensor = 2 (D 64, F 256, V 96, T 32):
    wte = 96 // 2 * 64 // 2  # [V/tensor, D/fsdp]
    wpe = 32 * 64 // 2  # [T, D/fsdp]
    c_attn, attn_proj = 64 // 2 * 192 // 2, 64 // 2 * 64 // 2  # [D/fsdp, 3D/tensor], [D/tensor, D/fsdp]
    c_fc, mlp_proj = 64 // 2 * 256 // 2, 256 // 2 * 64 // 2
    norms = 2 * 64  # ln_1, ln_2: replicated
    floats = wte + wpe + 2 * (c_attn + attn_proj + c_fc + mlp_proj + norms) + 64  # + ln_f
    m = p["memory"]
    assert m["params"] == 4 * floats == 109_824
    # AdamW's two moments shard like the params; five scalar counters are replicated
    assert 2 * m["params"] < m["opt_state"] <= 2 * m["params"] + 5 * 4
    assert m["total"] >= m["params"] + m["opt_state"] + m["activations"]
    assert plan.verdict(p).startswith("fits with ")
    c = p["collectives"]
    assert c["all-gather"]["count"] > 0 and c["all-reduce"]["count"] + c["reduce-scatter"]["count"] > 0
    xla_flops = p["cost"][0] * 4
    assert 0.9 < xla_flops / p["model_flops"] < 1.5  # 6N + 12LTD leaves out softmax, norms, the optimizer
    assert p["roofline"]["step_s"] == max(p["roofline"]["t_flops"], p["roofline"]["t_bytes"])


@needs_libtpu
def test_auto_compute_dtype_follows_the_target_devices():
    """train's rule (auto: bfloat16 on accelerators) holds for the compile-only TPU devices
    plan compiles for, not this CPU's."""
    import jax.numpy as jnp

    from jaxgpt import sharding, step

    tpu = sharding.make_mesh(config.MeshConfig(), plan.devices(plan.parse_target("v5e:2x2")))
    assert step.compute_dtype("auto", tpu) == jnp.bfloat16
    assert step.compute_dtype("auto", sharding.make_mesh(config.MeshConfig())) == jnp.float32
    assert step.compute_dtype("float32", tpu) == jnp.float32


@needs_libtpu
def test_too_big_is_a_verdict(capsys, tiny):
    """A step that needs more HBM than a chip has is an answer (exit 0), not a traceback."""
    code, out, err = run_cli(capsys, tiny, "--topology", "v5e-4", "--data.batch-size", "65536",
                             "--model.block-size", "1024", "--model.vocab-size", "4096")
    assert code == 0, err
    verdict = [line for line in out.splitlines() if "fit" in line]
    assert len(verdict) == 1 and verdict[0].startswith("does not fit by at least ")
    assert "15.75 GiB a device has" in verdict[0] and "Traceback" not in err


@needs_libtpu
@pytest.mark.parametrize("extra_gib, expected_rows, compiled_rows", [
    (lambda rows: 0, 15, [1, 2, 15, 16]),  # linear: 15 of the 15.75 GiB, guessed from 1 and 2 rows
    (lambda rows: 5 * (rows > 10), 10, [1, 2, 8, 9, 10, 11, 15]),  # a jump below the guess: bisection
])
def test_max_batch(monkeypatch, tiny, extra_gib, expected_rows, compiled_rows):
    """The largest batch whose memory fits, with a stand-in for the compile: 1 GiB a row a device."""
    compiled = []

    def memory(cfg, mesh):
        rows = cfg.data.batch_size // (mesh.shape["data"] * mesh.shape["fsdp"])
        compiled.append(rows)
        return {"total": (rows + extra_gib(rows)) * 2**30}

    monkeypatch.setattr(plan, "memory", memory)
    cfg = dataclasses.replace(config.load(str(tiny)), mesh=config.MeshConfig(data=2, fsdp=2))
    assert plan.max_batch(cfg, "v5e-4") == expected_rows * 4
    assert sorted(compiled) == compiled_rows


def test_info_counts_a_device_of_the_mesh(tmp_path):
    """`jaxgpt info`'s memory is per device: under fsdp over two CPU devices each holds half of
    the params, and XLA's arguments are exactly those shards and the batches."""
    path = tmp_path / "tiny.toml"
    path.write_text(TINY + "[mesh]\ndata = 1\nfsdp = 2\n")
    code = f"""
import json, jax
from jaxgpt import config, model, plan, sharding, step
cfg = config.load({str(path)!r})
compiled, params, opt_state = plan.compile_train_steps(cfg, sharding.make_mesh(cfg.mesh))
full = sum(x.size * 4 for x in jax.tree.leaves(model.abstract_params(cfg.model)))
print(json.dumps({{"memory": step.describe(cfg)["bytes"], "full": full,
                   "arguments": compiled.memory_analysis().argument_size_in_bytes}}))
"""
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(Path(plan.__file__).parents[1])}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    m = r["memory"]
    norms = 4 * (2 * 2 * 64 + 64)  # the LayerNorm scales stay whole on every device
    assert m["params"] == (r["full"] - norms) // 2 + norms
    batches = 2 * 8 // 2 * 32 * 4  # x and y: a device's 4 rows of 32 int32 tokens
    assert r["arguments"] == m["params"] + m["opt_state"] + batches  # (jit drops the unused iteration number)

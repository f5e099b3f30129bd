"""Several processes on localhost as one run (gloo over TCP): the losses of one process with
as many devices, each process reading only its rows, checkpoints moving between shapes,
and faults (a lost process, SIGTERM to one process, a job that cannot assemble) that end
every process with one line and lose nothing.

Every process is a real `jaxgpt train` (or a driver that runs several in one process) on a
free port, each launch bounded in time.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxgpt import checkpoint, cli

LAUNCH_TIMEOUT_S = 240

# A tiny model whose steps are fast under gloo; dropout on, so each process must draw the
# same masks as one process does; one step a call, so signals are checked every step.
ARGS = ["train", "shakespeare-char-cpu", "--model.n-layer", "2", "--model.n-head", "2", "--model.n-embd", "32",
        "--model.block-size", "16", "--model.dropout", "0.1", "--data.batch-size", "8", "--train.max-iters", "8",
        "--train.eval-interval", "4", "--train.eval-iters", "1", "--train.log-interval", "1",
        "--train.steps-per-call", "1", "--train.keep", "3", "--optim.warmup-iters", "4", "--mesh.init-timeout", "60"]
MESHES = {"data": ["--mesh.data", "-1"], "fsdp": ["--mesh.data", "1", "--mesh.fsdp", "-1"],
          "fsdp_tensor": ["--mesh.data", "1", "--mesh.fsdp", "-1", "--mesh.tensor", "2"]}

# Runs in every process of a launch (and in the one-process reference): the `jaxgpt train`
# runs named in RUNS (JSON: [name, extra args]), in this process, one after the other, as a
# worker of the job would; then writes what each process read of the dataset.
DRIVER = textwrap.dedent('''
    import json, os, sys
    os.environ["JAXGPT_WORKER"] = "1"  # run in this process, as the worker of a supervisor does
    from jaxgpt import cli, data
    opened = []
    open_dataset = data.open_dataset
    data.open_dataset = lambda d: opened.append(open_dataset(d)) or opened[-1]
    out, base = sys.argv[1], json.loads(sys.argv[2])
    read = {}
    for name, extra in json.loads(sys.argv[3]):
        rc = cli.main([*base, "--out-dir", os.path.join(out, name), *extra])
        assert rc == 0, (name, rc)
        read[name] = dict(opened[-1].bytes_read)
    import jax
    with open(os.path.join(out, f"read-{jax.process_index()}.json"), "w") as f:
        json.dump(read, f)
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(n: int, devices: int, i: int, port: int, kind: str = "jax") -> dict:
    """The environment of process `i` of `n`: JAX's variables, or SLURM's (as srun sets them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR", "JAX_NUM_PROC",
                                                                      "JAX_PROCESS_ID", "JAXGPT_WORKER"))}
    # Low LLVM optimisation compiles ~40% faster, the same math in every process and launch.
    env |= {"JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
    if kind == "slurm":
        return env | {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": str(n),
                      "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i), "JAX_COORDINATOR_PORT": str(port)}
    return env | {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(n),
                  "JAX_PROCESS_ID": str(i)}


def start(n: int, devices: int, argv: list[str], kind: str = "jax", port: int | None = None,
          ids: list[int] | None = None) -> list[subprocess.Popen]:
    """Processes `ids` (all by default) of a job of `n` processes."""
    port = port or free_port()
    return [subprocess.Popen([sys.executable, *argv], env=job_env(n, devices, i, port, kind), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in (range(n) if ids is None else ids)]


def finish(procs: list[subprocess.Popen], timeout: float = LAUNCH_TIMEOUT_S) -> list[tuple[int, str, str]]:
    """(returncode, stdout, stderr) of each process; all are killed past `timeout` seconds."""
    deadline = time.monotonic() + timeout
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"a process did not end within {timeout} s")
        out.append((p.returncode, o, e))
    return out


def drive(n: int, devices: int, out: Path, data_dir: Path, runs: list, kind: str = "jax") -> dict:
    """Launches the driver as `n` processes of `devices` CPU devices each (or one process
    without any job variables when n == 1); returns what each process read, by process."""
    script = out / "driver.py"
    out.mkdir(parents=True, exist_ok=True)
    script.write_text(DRIVER)
    argv = [str(script), str(out), json.dumps([*ARGS, "--data-dir", str(data_dir)]), json.dumps(runs)]
    if n == 1:
        env = {**job_env(1, devices, 0, 0), "JAX_NUM_PROCESSES": "1"}
        for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
            env.pop(k)
        procs = [subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)]
    else:
        procs = start(n, devices, argv, kind)
    for rc, o, e in finish(procs):
        assert rc == 0, e[-3000:]
    return {i: json.loads((out / f"read-{i}.json").read_text()) for i in range(n)}


def stopped_at_4(run: Path, copy: Path) -> None:
    """A copy of a finished run as if it had stopped at step 4 (its later checkpoints removed)."""
    shutil.copytree(run, copy)
    for step in checkpoint.saved_steps(copy):
        if step > 4:
            shutil.rmtree(copy / "checkpoints" / str(step))


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in sorted(records, key=lambda r: r["step"]) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dataset) -> dict:
    """One process with 4 devices, 2 processes with 2 (launched as SLURM would) and 4 with 1,
    training the same runs; checkpoints handed from one shape to another."""
    root = tmp_path_factory.mktemp("multihost")
    every_mesh = [[name, flags] for name, flags in MESHES.items()]
    # One process's losses do not depend on its mesh (the three agree within 2e-7): one reference.
    one = drive(1, 4, root / "1x4", tiny_dataset, [["data", MESHES["data"]]])
    stopped_at_4(root / "1x4" / "data", root / "2x2" / "from_one")  # 1 process -> 2
    two = drive(2, 2, root / "2x2", tiny_dataset, [*every_mesh, ["from_one", [*MESHES["fsdp"], "--resume"]]],
                kind="slurm")
    four = drive(4, 1, root / "4x1", tiny_dataset, [["fsdp_tensor", MESHES["fsdp_tensor"]]])
    return {"root": root, "read": {"1x4": one, "2x2": two, "4x1": four}}


@pytest.mark.parametrize("mesh", list(MESHES))
def test_two_processes_of_two_devices_equal_one_of_four(runs, mesh):
    want = losses(runs["root"] / "1x4" / "data")
    assert len(want) == 8 and want[-1] < want[0]
    np.testing.assert_allclose(losses(runs["root"] / "2x2" / mesh), want, rtol=1e-5)


def test_four_processes_of_one_device_equal_one_of_four(runs):
    np.testing.assert_allclose(losses(runs["root"] / "4x1" / "fsdp_tensor"),
                               losses(runs["root"] / "1x4" / "data"), rtol=1e-5)


def test_one_progress_log_and_metrics_file(runs):
    run = runs["root"] / "2x2" / "data"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 8 + 3  # 8 steps, 3 evaluations
    assert json.loads((run / "run.json").read_text())["process_count"] == 2


def test_each_process_reads_only_its_rows(runs):
    """Each of two processes reads half the batch rows; of four with a mesh fsdp=2 x tensor=2,
    also half (the two of a tensor pair hold the same rows). Each checks the hash of only the
    files it reads (both of this one-file-a-split dataset)."""
    one = runs["read"]["1x4"][0]["data"]
    for shape, run in (("2x2", "data"), ("2x2", "fsdp"), ("4x1", "fsdp_tensor")):
        for i, read in runs["read"][shape].items():
            assert read[run]["tokens"] * 2 == one["tokens"], (shape, run, i)
            assert read[run]["checked"] == one["checked"], (shape, run, i)


def test_checkpoints_move_between_process_counts_and_meshes(runs, tmp_path, capsys):
    root = runs["root"]
    # 1 process (data mesh) -> 2 processes (fsdp), inside the launch
    np.testing.assert_allclose(losses(root / "2x2" / "from_one"), losses(root / "1x4" / "data"), rtol=1e-5)
    # 2 processes (fsdp) -> this process, one device, data mesh
    run = tmp_path / "to_one"
    stopped_at_4(root / "2x2" / "fsdp", run)
    assert cli.main([*ARGS, "--data-dir", str(checkpoint.run_config(run).data.dir), "--out-dir", str(run),
                     "--resume", *MESHES["data"]]) == 0
    np.testing.assert_allclose(losses(run), losses(root / "1x4" / "data"), rtol=1e-5)
    capsys.readouterr()


def test_a_run_of_several_devices_is_used_on_one(runs, tmp_path, capsys):
    """eval and greedy sample of a run trained by 2 processes under fsdp x tensor give what
    the same run trained by one process gives; convert writes its params; info shows them
    sharded over the run's 4 devices."""
    import jaxgpt

    run, one = runs["root"] / "2x2" / "fsdp_tensor", runs["root"] / "1x4" / "data"
    out = {}
    for r in (run, one):
        assert cli.main(["eval", "--out-dir", str(r), "--json"]) == 0
        out[r, "eval"] = json.loads(capsys.readouterr().out)["loss"]
        assert cli.main(["sample", "--out-dir", str(r), "--num-samples", "1", "--max-new-tokens", "8",
                         "--temperature", "0"]) == 0
        out[r, "sample"] = capsys.readouterr().out
    np.testing.assert_allclose(out[run, "eval"], out[one, "eval"], rtol=1e-5)
    assert out[run, "sample"] == out[one, "sample"]

    assert cli.main(["convert", str(run), str(tmp_path / "hf")]) == 0
    cfg, params, _ = checkpoint.load_params(run)
    hf_cfg, hf_params = jaxgpt.load_hf(tmp_path / "hf")
    tokens = np.arange(16, dtype=np.int32)[None] % cfg.model.vocab_size
    np.testing.assert_allclose(jaxgpt.forward(hf_params, tokens, hf_cfg), jaxgpt.forward(params, tokens, cfg.model),
                               rtol=1e-5, atol=1e-5)

    env = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}  # info fakes the run's 4 devices
    info = subprocess.run([sys.executable, "-m", "jaxgpt.cli", "info", str(run)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert info.returncode == 0, info.stderr[-2000:]
    assert "(4 CPU devices, mesh data 1 × fsdp 2 × tensor 2" in info.stdout, info.stdout
    per_device = float(next(line for line in info.stdout.splitlines() if line.split()[:1] == ["params"]).split()[1])
    whole = sum(a.size * 4 for a in jax.tree.leaves(params)) / 2**20
    assert per_device < whole / 2  # most matrices split four ways; norms and biases whole


# ---- faults, through `jaxgpt train` as a user starts it (a supervisor and its worker) ----

def train_job(n: int, data_dir: Path, run: Path, *extra: str, port: int | None = None, ids: list[int] | None = None):
    argv = ["-m", "jaxgpt.cli", *ARGS, "--data-dir", str(data_dir), "--out-dir", str(run), *MESHES["fsdp"], *extra]
    return start(n, 2, argv, port=port, ids=ids)


def wait_for(path: Path, procs, holds=lambda text: True, timeout: float = LAUNCH_TIMEOUT_S) -> None:
    """Until `path` exists (and its text `holds`), while every process runs."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and (path.is_dir() or holds(path.read_text()))):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), f"{path} never appeared"
        time.sleep(0.2)


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def test_a_lost_process_then_resume_is_exact_and_sigterm_to_one_stops_all(runs, tiny_dataset, tmp_path):
    run, every_2 = tmp_path / "run", ["--train.eval-interval", "2", "--train.keep", "4"]  # the same steps
    # kill -9 of process 1 after the checkpoint of step 2: process 0 ends within 60 s, in one line
    procs = train_job(2, tiny_dataset, run, *every_2)
    wait_for(run / "checkpoints" / "2", procs)
    procs[1].kill()
    t = time.monotonic()
    (rc, _, err), _ = finish(procs, timeout=90)
    assert rc != 0 and time.monotonic() - t < 60
    line = one_line(err)
    assert "process 1 was lost" in line and "--resume" in line
    resumed_at = max(checkpoint.saved_steps(run))

    # --resume on both, then SIGTERM to process 1 alone: both stop at one step, save there, exit 0
    # (an evaluation and a save every step: the steps left last seconds, while the processes agree)
    procs = train_job(2, tiny_dataset, run, "--train.eval-interval", "1", "--train.keep", "4", "--resume")
    wait_for(run / "run.json", procs, lambda text: json.loads(text)["resumes"])  # metrics.jsonl trimmed by now
    wait_for(run / "metrics.jsonl", procs, lambda text: f'"step": {resumed_at}, "loss"' in text)  # a step done
    procs[1].send_signal(signal.SIGTERM)
    results = finish(procs)
    assert [rc for rc, _, _ in results] == [0, 0], results[0][2][-2000:] + results[1][2][-2000:]
    assert "iter " in results[0][1] and results[1][1].strip() == ""  # process 0 alone prints progress
    stopped = max(checkpoint.saved_steps(run))
    assert f"stopped at step {stopped}" in results[0][1] and resumed_at < stopped
    assert losses(run) == losses(runs["root"] / "2x2" / "fsdp")[:stopped]  # bitwise, across the lost process


def test_a_job_that_cannot_assemble_ends_in_one_line(tiny_dataset, tmp_path):
    short = ["--mesh.init-timeout", "5"]
    busy = socket.socket(socket.AF_INET6)  # IPv4 and IPv6, as the coordinator binds
    busy.bind(("::", 0))
    busy.listen()
    t = time.monotonic()
    jobs = {"two of three": train_job(3, tiny_dataset, tmp_path / "a", *short, ids=[0, 1]),
            "no coordinator": train_job(2, tiny_dataset, tmp_path / "b", *short, ids=[1]),
            "port in use": train_job(2, tiny_dataset, tmp_path / "c", *short, port=busy.getsockname()[1], ids=[0])}
    results = {what: finish(procs, timeout=90) for what, procs in jobs.items()}
    busy.close()
    assert time.monotonic() - t < 60
    for what, res in results.items():
        for rc, _, err in res:
            assert rc != 0, what
            line = one_line(err)
            assert {"two of three": "not every process joined", "no coordinator": "cannot be reached",
                    "port in use": "in use"}[what] in line, (what, line)

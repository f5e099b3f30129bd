"""Step time of one run as 1 process x 4 CPU devices, 2 x 2 and 4 x 1 on this machine
(processes joined over localhost by gloo), each a real `jaxgpt train`, one after another.

    python bench/multihost.py [--iters 60] [--preset shakespeare-char-cpu] [--mesh fsdp|data]

Prints the median ms per step (the first block, which compiles, left out) and the last loss
of each shape, which agree across shapes. Data: the embedded plays, prepared into a
temporary directory."""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(n: int, devices: int, args: list[str], out: Path) -> dict:
    port = free_port()
    procs = []
    for i in range(n):
        env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}
        if n > 1:
            env |= {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(n),
                    "JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxgpt.cli", *args, "--out-dir", str(out)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=1800)
        if p.returncode:
            sys.exit(f"{n} x {devices} failed: {err[-2000:]}")
    records = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "ms_per_step" in r]
    return {"ms": statistics.median(r["ms_per_step"] for r in steps[len(steps) // 6:]), "loss": steps[-1]["loss"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--preset", default="shakespeare-char-cpu")
    ap.add_argument("--mesh", choices=["fsdp", "data"], default="fsdp")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "jaxgpt.cli", "prepare", "shakespeare", "--out", str(tmp / "data")],
                       check=True, stdout=subprocess.DEVNULL)
        mesh = ["--mesh.data", "1", "--mesh.fsdp", "-1"] if a.mesh == "fsdp" else ["--mesh.data", "-1"]
        args = ["train", a.preset, "--data-dir", str(tmp / "data"), "--train.max-iters", str(a.iters),
                "--train.eval-interval", str(a.iters), "--train.log-interval", "1", *mesh]
        print(f"{a.preset}, {a.iters} iterations, mesh {a.mesh}; {cpu_name()}, {os.cpu_count()} cores")
        for n, d in ((1, 4), (2, 2), (4, 1)):
            r = run(n, d, args, tmp / f"{n}x{d}")
            print(f"  {n} process(es) x {d} device(s): {r['ms']:8.1f} ms/step, last loss {r['loss']:.4f}", flush=True)


if __name__ == "__main__":
    main()

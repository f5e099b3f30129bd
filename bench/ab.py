"""Before and after in one invocation: a bench script run on jaxgpt at another git revision
and on this working tree, alternately, so both meet the same machine within minutes.

    python bench/ab.py REV [--rounds 2] -- bench/generate.py --batches 1 8

The script is this tree's in both runs; only the imported jaxgpt differs (REV's src/,
exported with `git archive`, first on PYTHONPATH). Each run's output is printed whole under
a header naming the revision, the round and the CPU.
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rev", help="the git revision to compare against (e.g. HEAD~3, a commit)")
    ap.add_argument("--rounds", type=int, default=2)
    argv = sys.argv[1:]
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        ap.error("give the bench script after --, e.g. -- bench/generate.py")
    args = ap.parse_args(argv[: argv.index("--")])
    script = argv[argv.index("--") + 1 :]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True).stdout
    after = f"{head.strip()}{' + uncommitted changes' if dirty.strip() else ''}"
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", args.rev, "src"], cwd=ROOT, capture_output=True)
        if archive.returncode:
            sys.exit(f"error: git archive {args.rev} failed: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        trees = {f"before ({args.rev})": Path(tmp) / "src", f"after ({after})": ROOT / "src"}
        for round_ in range(1, args.rounds + 1):
            for label, src in trees.items():
                print(f"\n===== {label}, round {round_}/{args.rounds}, {cpu_name()}, {os.cpu_count()} CPUs =====",
                      flush=True)
                env = os.environ | {"PYTHONPATH": os.pathsep.join([str(src), str(ROOT / "bench")])}
                subprocess.run([sys.executable, *script], cwd=ROOT, env=env)


if __name__ == "__main__":
    main()

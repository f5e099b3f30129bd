"""Seconds to val loss <= 1.88 on tiny Shakespeare: `jaxgpt train shakespeare-char-speedrun`
beside nanoGPT's own train.py on its README CPU command, in one invocation, over seeds.

    python bench/speedrun.py --nanogpt PATH [--seeds 1337 1338 1339] [--target 1.88]

For each seed, nanoGPT runs first, then jaxgpt, on the same token files (tiny Shakespeare,
nanoGPT's 90/10 split, from ../shared/data where there is a copy, else downloaded). A run's
time to the target is the wall time from its process start to the moment it prints the first
evaluation at or below the target (start-up, compilation and every evaluation counted); the
run is then stopped. nanoGPT's CPU command reaches 1.88 on few seeds within its 2000
iterations, so it runs with --max_iters and --lr_decay_iters raised to --nanogpt-iters
(default 4000), the rest as in its README (see bench/nanogpt.py).
"""

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nanogpt  # noqa: E402

EVAL_LINE = re.compile(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)")


def time_to_target(cmd: list[str], cwd: Path, target: float, env: dict | None = None):
    """(seconds, step, val loss) at the first eval line <= `target`, or (None, last step,
    last val loss) when the run ends without reaching it."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=env, start_new_session=True)
    last, tail = (None, None), []
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-20:]
        m = EVAL_LINE.match(line)
        if m:
            last = (int(m.group(1)), float(m.group(2)))
            if last[1] <= target:
                seconds = time.perf_counter() - t0
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return seconds, *last
    if proc.wait():
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n" + "\n".join(tail))
    return None, *last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", type=Path, required=True, help="a karpathy/nanoGPT checkout")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--nanogpt-iters", type=int, default=4000)
    ap.add_argument("--preset", default="shakespeare-char-speedrun")
    args = ap.parse_args()

    jaxgpt_bin = Path(sys.executable).parent / "jaxgpt"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_dir = nanogpt.prepare_tinyshakespeare(work)
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(work / "xla")}  # cold: compilation counted
        rows = []
        for seed in args.seeds:
            nanogpt.copy_nanogpt(args.nanogpt, work, seed)
            n = args.nanogpt_iters
            nano = time_to_target(nanogpt.nanogpt_command(work / f"nano{seed}", f"--max_iters={n}", f"--lr_decay_iters={n}"),
                                  work, args.target)
            ours = time_to_target([str(jaxgpt_bin), "train", args.preset, "--data-dir", str(data_dir), "--out-dir",
                                   str(work / f"jaxgpt{seed}"), "--train.seed", str(seed)], work, args.target, env)
            rows.append((seed, nano, ours))
            print(f"seed {seed}: nanoGPT {nano}, jaxgpt {ours}", flush=True)

    def cell(r):
        return f"{r[0]:.1f} s (step {r[1]}, {r[2]:.4f})" if r[0] is not None else f"not reached (step {r[1]}, {r[2]:.4f})"

    print(f"\ntime to val loss <= {args.target} (process start to that eval; nanoGPT --max_iters {args.nanogpt_iters})")
    print("| seed | nanoGPT | jaxgpt | jaxgpt / nanoGPT |\n|---|---|---|---|")
    for seed, nano, ours in rows:
        ratio = f"{ours[0] / nano[0]:.2f}" if nano[0] and ours[0] else "-"
        print(f"| {seed} | {cell(nano)} | {cell(ours)} | {ratio} |")
    reached = [(n[0], o[0]) for _, n, o in rows if n[0] is not None and o[0] is not None]
    if reached:
        nano_mean, ours_mean = statistics.mean(n for n, _ in reached), statistics.mean(o for _, o in reached)
        print(f"| mean | {nano_mean:.1f} s | {ours_mean:.1f} s | {ours_mean / nano_mean:.2f} (goal <= 0.33) |")
    print(f"jaxgpt reached {args.target} on {sum(o[0] is not None for _, _, o in rows)} of {len(rows)} seeds, "
          f"nanoGPT on {sum(n[0] is not None for _, n, _ in rows)}")


if __name__ == "__main__":
    main()

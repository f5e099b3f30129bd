"""Val loss of the shakespeare-char-cpu preset over several seeds, beside nanoGPT's own
train.py over the same seeds: one run of either is one draw from a distribution whose
spread (~0.015) is wider than the gap between a bar and a single reference run.

    python bench/shakespeare_seeds.py --seeds 1337 1338 1339 1340 [--nanogpt PATH]

PATH is a checkout of karpathy/nanoGPT; its train.py runs on the same token files (with
nanoGPT's CPU command from its README) from a copy whose `torch.manual_seed(1337 + ...)`
line takes the seed. Both report the mean over 20 random val batches at iteration 2000.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nanogpt  # noqa: E402


def jaxgpt_val_loss(data_dir: Path, out_dir: Path, seed: int) -> float:
    subprocess.run([str(Path(sys.executable).with_name("jaxgpt")), "train", "shakespeare-char-cpu", "--data.dir", str(data_dir),
                    "--train.out-dir", str(out_dir), "--train.seed", str(seed), "--force"],
                   check=True, stdout=subprocess.DEVNULL)
    vals = [json.loads(s) for s in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["val_loss"] for r in reversed(vals) if "val_loss" in r and r["step"] == 2000)


def nanogpt_val_loss(nanogpt_dir: Path, work: Path, seed: int) -> float:
    nanogpt.copy_nanogpt(nanogpt_dir, work, seed)
    _, lines = nanogpt.run_timed(nanogpt.nanogpt_command(work / f"n{seed}", "--log_interval=100",
                                                         "--always_save_checkpoint=False"), work)
    return nanogpt.final_val_loss(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339, 1340])
    ap.add_argument("--nanogpt", type=Path, help="a karpathy/nanoGPT checkout (needs torch)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="jaxgpt-seeds-"))
    data_dir = nanogpt.prepare_tinyshakespeare(work)

    results = {"jaxgpt": []} | ({"nanoGPT": []} if args.nanogpt else {})
    for seed in args.seeds:
        results["jaxgpt"].append(jaxgpt_val_loss(data_dir, work / f"j{seed}", seed))
        if args.nanogpt:
            results["nanoGPT"].append(nanogpt_val_loss(args.nanogpt.resolve(), work, seed))
        print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in results.items()), flush=True)
    for name, v in results.items():
        sd = statistics.stdev(v) if len(v) > 1 else float("nan")
        print(f"{name:>8}: mean {statistics.mean(v):.4f}, sd {sd:.4f}, min {min(v):.4f}, max {max(v):.4f} "
              f"over {len(v)} seeds; at or under 1.89: {sum(x <= 1.89 for x in v)}")


if __name__ == "__main__":
    main()

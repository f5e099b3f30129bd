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
import pickle
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_CPU = ["--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=100", "--block_size=64",
               "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
               "--lr_decay_iters=2000", "--dropout=0.0", "--always_save_checkpoint=False"]


def jaxgpt_val_loss(data_dir: Path, out_dir: Path, seed: int) -> float:
    subprocess.run([str(Path(sys.executable).with_name("jaxgpt")), "train", "shakespeare-char-cpu", "--data.dir", str(data_dir),
                    "--train.out-dir", str(out_dir), "--train.seed", str(seed), "--force"],
                   check=True, stdout=subprocess.DEVNULL)
    vals = [json.loads(s) for s in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["val_loss"] for r in reversed(vals) if "val_loss" in r and r["step"] == 2000)


def nanogpt_val_loss(nanogpt: Path, work: Path, seed: int) -> float:
    train_py, seed_line = (nanogpt / "train.py").read_text(), "torch.manual_seed(1337 + seed_offset)"
    if seed_line not in train_py:
        raise SystemExit(f"{nanogpt}/train.py has no `{seed_line}` line to reseed")
    (work / "train.py").write_text(train_py.replace(seed_line, f"torch.manual_seed({seed} + seed_offset)"))
    for f in ("model.py", "configurator.py"):
        shutil.copy(nanogpt / f, work / f)
    shutil.copytree(nanogpt / "config", work / "config", dirs_exist_ok=True)
    out = subprocess.run([sys.executable, "train.py", "config/train_shakespeare_char.py", "--dataset=sc",
                          f"--out_dir={work / f'n{seed}'}", *NANOGPT_CPU],
                         cwd=work, check=True, capture_output=True, text=True).stdout
    return float(re.search(r"step 2000: train loss [\d.]+, val loss ([\d.]+)", out).group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339, 1340])
    ap.add_argument("--nanogpt", type=Path, help="a karpathy/nanoGPT checkout (needs torch)")
    args = ap.parse_args()

    from jaxgpt import prepare, sources

    work = Path(tempfile.mkdtemp(prefix="jaxgpt-seeds-"))
    data_dir = work / "data" / "sc"  # nanoGPT reads data/<dataset>/ under its working directory
    prepare.prepare(sources.resolve_source("tinyshakespeare", str(CORPUS)), data_dir)
    chars = json.loads((data_dir / "meta.json").read_text())["tokenizer"]["chars"]
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)

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

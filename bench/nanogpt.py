"""Running karpathy/nanoGPT's own train.py beside jaxgpt on the same token files (benchmarks only).

`prepare_tinyshakespeare(work)` writes jaxgpt's char dataset of tiny Shakespeare (the copy
in ../shared/data where there is one, else downloaded as `jaxgpt prepare tinyshakespeare`
does) to WORK/data/sc with the meta.pkl nanoGPT reads; `run_timed` runs a command
and stamps each line it prints with the seconds since the command started.
"""

import json
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
# nanoGPT's README command for a CPU, with the eval batches of jaxgpt's preset.
CPU_FLAGS = ["--device=cpu", "--compile=False", "--eval_iters=20", "--block_size=64", "--batch_size=12",
             "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000",
             "--dropout=0.0"]
SEED_LINE = "torch.manual_seed(1337 + seed_offset)"


def prepare_tinyshakespeare(work: Path) -> Path:
    """jaxgpt's char dataset of tiny Shakespeare in WORK/data/sc, with nanoGPT's meta.pkl beside it."""
    from jaxgpt import prepare, sources
    from jaxgpt.errors import UserError

    data_dir = work / "data" / "sc"  # nanoGPT reads data/<dataset>/ under its working directory
    local = str(CORPUS) if CORPUS.is_file() else None
    try:
        prepare.prepare(sources.resolve_source("tinyshakespeare", local, cache_dir=work), data_dir)
    except UserError as e:
        raise SystemExit(f"tiny Shakespeare: {e} (for the benchmarks: put it at {CORPUS})") from None
    chars = json.loads((data_dir / "meta.json").read_text())["tokenizer"]["chars"]
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    return data_dir


def copy_nanogpt(nanogpt: Path, work: Path, seed: int = 1337) -> None:
    """nanoGPT's train.py, model.py, configurator.py and config/ in WORK, its seed set to `seed`."""
    train_py = (nanogpt / "train.py").read_text()
    if SEED_LINE not in train_py:
        raise SystemExit(f"{nanogpt}/train.py has no `{SEED_LINE}` line to reseed")
    (work / "train.py").write_text(train_py.replace(SEED_LINE, f"torch.manual_seed({seed} + seed_offset)"))
    for f in ("model.py", "configurator.py"):
        shutil.copy(nanogpt / f, work / f)
    shutil.copytree(nanogpt / "config", work / "config", dirs_exist_ok=True)


def nanogpt_command(out_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-u", "train.py", "config/train_shakespeare_char.py", "--dataset=sc",
            f"--out_dir={out_dir}", *CPU_FLAGS, *extra]


def run_timed(cmd: list[str], cwd: Path, env: dict | None = None) -> tuple[float, list[tuple[float, str]]]:
    """(wall seconds, [(seconds since start, line)]) of a command; fails loudly if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=env)
    lines = [(time.perf_counter() - t0, line.rstrip("\n")) for line in proc.stdout]
    if proc.wait():
        tail = "\n".join(s for _, s in lines[-20:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{tail}")
    return time.perf_counter() - t0, lines


def final_val_loss(lines: list[tuple[float, str]], it: int = 2000) -> float:
    """The val loss both print at iteration `it`: 'step 2000: train loss X, val loss Y'."""
    for _, s in lines:
        m = re.match(rf"step {it}: train loss [\d.]+, val loss ([\d.]+)", s)
        if m:
            return float(m.group(1))
    raise SystemExit(f"no 'step {it}: ... val loss' line in the output")

"""`jaxgpt plot`: train and val loss of one or several runs, against steps and tokens, as a PNG."""

import json
from pathlib import Path

from jaxgpt import checkpoint
from jaxgpt.errors import UserError


class PlotError(UserError):
    """A run directory without metrics, or matplotlib missing."""


def _curves(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir} has no metrics.jsonl: is it a jaxgpt run directory?")
    cfg = checkpoint.run_config(run_dir)
    tokens_per_step = cfg.train.grad_accum * cfg.data.batch_size * cfg.model.block_size
    records = [json.loads(line) for line in path.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    return {"train": train, "val": val, "tokens_per_step": tokens_per_step}


def plot_runs(run_dirs: list[str], out: str) -> Path:
    """Writes the figure to `out`; returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install matplotlib (or jaxgpt[plot])") from None
    runs = {d: _curves(Path(d)) for d in run_dirs}
    fig, (by_step, by_tokens) = plt.subplots(1, 2, figsize=(12.0, 4.5), dpi=100)
    for (name, c), color in zip(runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10):
        for ax, scale in ((by_step, 1), (by_tokens, c["tokens_per_step"])):
            if c["train"]:
                steps, losses = zip(*c["train"])
                ax.plot([s * scale for s in steps], losses, color=color, alpha=0.5, lw=1, label=f"{name} train")
            if c["val"]:
                steps, losses = zip(*c["val"])
                ax.plot([s * scale for s in steps], losses, color=color, marker="o", lw=2, label=f"{name} val")
    by_step.set_xlabel("step")
    by_tokens.set_xlabel("tokens")
    for ax in (by_step, by_tokens):
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    by_step.legend(fontsize="small")
    fig.tight_layout()
    out_path = Path(out)
    fig.savefig(out_path)
    plt.close(fig)
    return out_path

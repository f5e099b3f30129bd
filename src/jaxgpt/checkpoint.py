"""Checkpoints through orbax: a run directory keeps the latest ones and the best by val loss.

    RUN_DIR/checkpoints/<step>/   the latest `keep` checkpoints (params, opt_state, meta)
    RUN_DIR/best/<step>/          the one with the lowest val loss so far (params, meta)
    RUN_DIR/config.toml           the resolved config
    RUN_DIR/data_meta.json        the dataset's meta.json: its tokenizer, with a sha256
    RUN_DIR/tokenizer.json|.model a bpe or sentencepiece tokenizer's file, copied from the
                                  dataset: a run directory samples wherever it is copied

orbax commits a step directory atomically, so a crash mid-save never leaves a
checkpoint that looks complete.
"""

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxgpt import config as config_lib
from jaxgpt import model
from jaxgpt import tokenizer as tokenizer_lib
from jaxgpt.errors import UserError


class CheckpointError(UserError):
    """No usable checkpoint where the user pointed."""


# What reading a damaged checkpoint raises (files missing, truncated or overwritten); a
# checkpoint that fails with another error is not taken for damaged.
DAMAGE = (OSError, ValueError, KeyError)


def _manager(directory: Path, keep: int | None = None, create: bool = False) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory.absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=create,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=create,  # what a killed save left behind
        ),
    )


def managers(run_dir: Path, keep: int) -> dict[str, ocp.CheckpointManager]:
    return {"latest": _manager(run_dir / "checkpoints", keep, True), "best": _manager(run_dir / "best", 1, True)}


def save(mngr: ocp.CheckpointManager, step: int, meta: dict, params, opt_state=None) -> None:
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
    if opt_state is not None:
        items["opt_state"] = ocp.args.StandardSave(opt_state)
    mngr.save(step, args=ocp.args.Composite(**items), force=True)
    mngr.wait_until_finished()


def saved_steps(run_dir: Path) -> list[int]:
    """Steps of the committed checkpoints in a run directory (touches nothing)."""
    return sorted(ocp.utils.checkpoint_steps(Path(run_dir).absolute() / "checkpoints"))  # no manager: no collectives


def restore(mngr: ocp.CheckpointManager, step: int, abstract_params, abstract_opt_state=None):
    """(params, opt_state or None, meta) of `step`; arrays take the shardings of the abstract trees."""
    items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
    if abstract_opt_state is not None:
        items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
    out = mngr.restore(step, args=ocp.args.Composite(**items))
    return out["params"], out.get("opt_state"), out["meta"]


def run_config(run_dir: Path) -> config_lib.Config:
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a jaxgpt run directory (no config.toml): train into it first")
    return config_lib.loads(path.read_text(), where=str(path))


def write_run_files(run_dir: Path, cfg: config_lib.Config, data_meta: dict, data_dir: Path) -> None:
    """The resolved config, the meta.json of the dataset in `data_dir` and its tokenizer's file
    (what sampling needs, so that the run directory works wherever it is copied)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_lib.copy_file(data_meta["tokenizer"], data_dir, run_dir)
    for name, text in (("config.toml", config_lib.dumps(cfg)),
                       ("data_meta.json", json.dumps(data_meta, indent=1, ensure_ascii=False))):
        tmp = run_dir / (name + ".tmp")  # renamed when whole: a resume stopped here keeps the run loadable
        tmp.write_text(text)
        os.replace(tmp, run_dir / name)


def data_meta(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "data_meta.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a jaxgpt run directory (no data_meta.json)")
    return json.loads(path.read_text())


def run_tokenizer(run_dir: str | Path):
    """The tokenizer of the data a run was trained on, from the run directory alone."""
    meta = data_meta(run_dir)["tokenizer"]
    if "file" in meta and not (Path(run_dir) / meta["file"]).is_file():
        raise CheckpointError(f"{run_dir} lacks its tokenizer file {meta['file']} (runs trained before jaxgpt kept "
                              f"a copy): copy {meta['file']} from the dataset the run was trained on into {run_dir}")
    return tokenizer_lib.tokenizer_from_meta(meta, Path(run_dir))


def load_params(run_dir: str | Path, which: str = "best"):
    """(config, params, meta) of a run's best or latest checkpoint, for sampling and evaluation."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    if which not in ("best", "latest"):
        raise CheckpointError(f"--checkpoint must be 'best' or 'latest', got {which!r}")
    mngr = _manager(run_dir / ("best" if which == "best" else "checkpoints"))
    step = mngr.latest_step()
    if step is None and which == "best":
        mngr = _manager(run_dir / "checkpoints")
        step = mngr.latest_step()
    if step is None:
        raise CheckpointError(f"no checkpoint in {run_dir}: train with --train.eval-interval smaller than max-iters")
    # onto this process's default device, whatever devices the run was saved from
    on_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_device),
                            model.abstract_params(cfg.model))
    try:
        params, _, meta = restore(mngr, step, abstract)
    except Exception as e:  # orbax/tensorstore raise many types for damaged files
        raise CheckpointError(
            f"checkpoint {mngr.directory / str(step)} cannot be read ({type(e).__name__}); it may be damaged: "
            "try --checkpoint latest or best, or resume training to fall back to an older one"
        ) from None
    return cfg, params, meta


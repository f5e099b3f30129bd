"""What a run records besides checkpoints: metrics (metrics.jsonl and TensorBoard event
files) and provenance (run.json: versions, devices, data, start/end and every resume).
Weights & Biases is a hook (hooks.py)."""

import datetime
import hashlib
import importlib
import importlib.metadata
import json
import subprocess
import threading
from pathlib import Path

import jax


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The commit of the jaxgpt source tree, when it runs from a git checkout."""
    src = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


class RunLog:
    """Appends metric records to metrics.jsonl and TensorBoard; keeps run.json up to date.
    In a multi-host run only process 0 writes."""

    def __init__(self, run_dir: Path, data_meta: dict, resumed_at: int | None):
        self.writes = jax.process_index() == 0
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.info_path = run_dir / "run.json"
        if resumed_at is None:
            if self.writes:
                self.metrics_path.unlink(missing_ok=True)
            info = {"started": _now(), "resumes": []}
        else:
            self._trim(resumed_at)
            info = json.loads(self.info_path.read_text()) if self.info_path.exists() else {"resumes": []}
            info["resumes"].append({"step": resumed_at, "time": _now()})
        info.update(
            jaxgpt=_version("jaxgpt"),
            git_commit=_git_commit(),
            jax=jax.__version__,
            jaxlib=_version("jaxlib"),
            devices=[str(d) for d in jax.devices()],
            device_kind=jax.devices()[0].device_kind,
            process_count=jax.process_count(),
            data={"dir": data_meta.get("dir"), "source": data_meta.get("source"),
                  "source_sha256": data_meta.get("source_sha256"),
                  "meta_sha256": hashlib.sha256(json.dumps(data_meta, sort_keys=True).encode()).hexdigest()},
            finished=None,
        )
        self.info = info
        self._write_info()
        self._tb = None
        if self.writes:  # tensorboardX takes seconds to import (torch, where installed): start now, beside the compiling
            threading.Thread(target=importlib.import_module, args=("tensorboardX",), daemon=True).start()
        self.status = "running"  # the training loop sets: finished, stopped, diverged or failed
        self._purge_step = resumed_at  # TensorBoard hides what a stopped run logged past this

    def _trim(self, step: int) -> None:
        """Drops what a stopped run logged past the checkpoint it resumes from."""
        if not self.metrics_path.exists() or not self.writes:
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            rec = json.loads(line)
            if rec["step"] < step or (rec["step"] == step and "val_loss" in rec):
                keep.append(line)
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    def _write_info(self) -> None:
        if not self.writes:
            return
        tmp = self.info_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.info, indent=1))
        tmp.replace(self.info_path)

    def write(self, record: dict) -> None:
        if not self.writes:
            return
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            from tensorboardX import SummaryWriter  # waits for the import started in __init__

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self._purge_step)
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for key, value in numbers.items():
            self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Records the end of the run and its status."""
        if self._tb is not None:
            self._tb.close()
        self.info.update(finished=_now(), status=self.status)
        self._write_info()

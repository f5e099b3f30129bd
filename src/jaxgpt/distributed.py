"""Several processes as one run: joining them, agreeing on when to stop, acting once for all,
and ending every process with one clear line when another one is lost.

A multi-process `jaxgpt train` runs as a small supervisor around a worker process. The
worker joins the job (`jax.distributed.initialize`) and trains. When a peer dies, JAX's
coordination service ends every other worker from C++ with a check-failure stack; the
supervisor keeps such output to itself (unless --debug) and says in one line which process
was lost and how to continue. Killing the supervisor kills its worker.
"""

import collections
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from jaxgpt.config import ConfigError

# jax is imported in the functions that use it: the supervisor never does, so it starts at once.

WORKER = "JAXGPT_WORKER"  # set in the supervised worker's environment
JOINED = "jaxgpt: joined"  # the worker's stderr line once every process has joined
# A lost process is declared after this long without heartbeats; the survivors' lines follow.
HEARTBEAT_TIMEOUT_S = 20


class DistributedError(ConfigError):
    """A multi-process job that cannot start as described by its environment."""


def _cluster():
    """The cluster JAX's `initialize()` would detect by itself (SLURM, Open MPI, Kubernetes,
    Cloud TPU), or None. JAX keeps its detectors in a private module: without it, none."""

    try:
        from jax._src import clusters
    except ImportError:
        return None
    return next((c for c in clusters.ClusterEnv._cluster_types if not c.opt_in_only_method and c.is_env_present()),
                None)


def requested() -> bool:
    """Whether this process is one of several: JAX_COORDINATOR_ADDRESS is set, or a cluster
    that JAX detects by itself describes the job."""
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or _cluster() is not None


def initialize(init_timeout: int) -> None:
    """Joins the processes of a multi-process run (see `requested`); nothing on one host.
    Every process must join within `init_timeout` seconds, or all of them stop."""
    import jax

    if jax.distributed.is_initialized() or not requested():
        return
    kwargs = dict(initialization_timeout=init_timeout, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        try:
            num, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise DistributedError("JAX_COORDINATOR_ADDRESS is set: also set JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                                   "(integers) for every process") from None
        if not 0 <= pid < num:
            raise DistributedError(f"JAX_PROCESS_ID {pid} with JAX_NUM_PROCESSES {num}: give each process an id "
                                   f"from 0 to {num - 1}")
        kwargs |= dict(coordinator_address=address, num_processes=num, process_id=pid)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # raised before any peer is involved: a bad address, a port in use
        where = address or f"the address {_cluster().__name__} gives"
        if "Failed to start RPC server" in str(e):
            raise DistributedError(_cannot_listen(where)) from None
        raise DistributedError(f"cannot join the job at {where}: {str(e).splitlines()[0]}") from None
    print(f"{JOINED} {jax.process_index()} {jax.process_count()}", file=sys.stderr, flush=True)


def is_multiprocess() -> bool:
    import jax

    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name`."""
    from jax.experimental import multihost_utils

    if is_multiprocess():
        multihost_utils.sync_global_devices(name)


def all_agree(ok: bool) -> bool:
    """True where `ok` holds on every process."""
    import numpy as np
    from jax.experimental import multihost_utils

    if not is_multiprocess():
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def stop_requested(check: int, local: list) -> bool:
    """Whether to stop (and save) now, at the `check`-th check of the loop (0, 1, 2, ...: JAX
    decides by that count). On one process: when a signal was recorded in `local`. On
    several: at the check JAX's preemption service has every process agree on once any of
    them got SIGTERM (train.py turns SIGINT into SIGTERM). Called at the same points of the
    loop on every process."""
    from jax.experimental import multihost_utils

    if is_multiprocess():
        return multihost_utils.reached_preemption_sync_point(check)
    return bool(local)


# ---- the supervisor -------------------------------------------------------------------

# The C++ runtime's lines: its log on stderr ("E1207 08:00:13.159205 8587 file.cc:289] ...",
# whose messages run on over several lines, up to the worker's own "error: " line), stack
# frames, and gloo's connection lines on stdout (printed concurrently, so they may come
# interleaved).
_NATIVE_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ \S+:\d+\]")
_NATIVE_OTHER = re.compile(r"^(\*\*\* |\s+@\s+0x)|\[Gloo\]|is connected to \d+ peer ranks")


def _cannot_listen(address: str) -> str:
    return (f"process 0 cannot listen on {address}: the port is in use or the host is not this one; pick a free port "
            "in JAX_COORDINATOR_ADDRESS")


def _lost_process(native: str, joined: bool, reached: bool, address: str | None) -> str:
    """What happened to a worker the runtime ended, as a sentence: from its C++ output, whether
    it had joined the job, and whether the coordinator's address was ever reachable."""
    if not joined:
        num = os.environ.get("JAX_NUM_PROCESSES", "all")
        if "Failed to add port to server" in native:  # the runtime may crash instead of raising
            return _cannot_listen(address or "the coordinator's address")
        if address and not reached:
            return (f"the coordinator {address} cannot be reached: start process 0 there first, or fix "
                    "JAX_COORDINATOR_ADDRESS")
        return (f"not every process joined the job at {address or 'the coordinator'}: check that {num} processes "
                "were started, with ids 0 to JAX_NUM_PROCESSES - 1 and the same JAX_NUM_PROCESSES")
    m = re.search(r"Task (\d+) heartbeat timeout|stopped sending heartbeats\):\s*(\d+)", native)
    if m:
        return f"process {m.group(1) or m.group(2)} was lost (it stopped sending heartbeats)"
    return "process 0 (the coordinator) was lost"


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=3).close()
    except (OSError, ValueError):
        return False
    return True


def die_with_parent() -> None:
    """On Linux, the kernel kills this worker when its supervisor dies (kill -9 included)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the supervisor died before the call
            os._exit(1)


def is_worker() -> bool:
    return os.environ.get(WORKER) == "1"


def supervise(argv: list[str], debug: bool) -> int:
    """Runs `jaxgpt ARGV` as a worker process and returns its exit code. Its output passes
    through but for the C++ runtime's (kept back unless `debug`); a worker ended by the
    runtime gets one line saying which process was lost. SIGINT and SIGTERM are passed on."""
    env = {**os.environ, WORKER: "1"}
    worker = subprocess.Popen([sys.executable, "-m", "jaxgpt.cli", *argv, *(["--debug"] if debug else [])],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                              process_group=0)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: worker.send_signal(signum))
    native = collections.deque(maxlen=400)  # the runtime's last lines
    state = {"as": os.environ.get("JAX_PROCESS_ID", "?")}  # + "joined", "reached"

    def relay(stream, out) -> None:
        in_log = False
        for line in stream:
            if line.startswith(JOINED):
                state.update({"as": line.split()[2], "joined": True})
                continue
            in_log = bool(_NATIVE_LOG.match(line)) or (in_log and not line.startswith("error: "))
            hide = in_log or bool(_NATIVE_OTHER.search(line))
            if hide:
                native.append(line)
            if debug or not hide:
                out.write(line)
                out.flush()

    address = os.environ.get("JAX_COORDINATOR_ADDRESS")

    def probe() -> None:  # until the job has assembled: can the coordinator be reached at all?
        while address and "joined" not in state and worker.poll() is None:
            if _reachable(address):
                state["reached"] = True
                return
            time.sleep(1)

    relays = [threading.Thread(target=relay, args=(worker.stdout, sys.stdout)),
              threading.Thread(target=relay, args=(worker.stderr, sys.stderr))]
    for t in relays:
        t.start()
    threading.Thread(target=probe, daemon=True).start()
    rc = worker.wait()
    for t in relays:
        t.join()
    if rc >= 0:
        return rc
    what = _lost_process("".join(native), "joined" in state, "reached" in state, address)
    tail = "; once every process can run again, start them all with --resume" if "joined" in state else ""
    print(f"error: process {state['as']}: {what}{tail} (--debug shows the runtime's output)", file=sys.stderr,
          flush=True)
    return 1


def in_job() -> bool:
    """Whether this is a supervised worker that has joined a job of several processes."""
    if not is_worker():
        return False
    import jax

    return jax.distributed.is_initialized()


def exit_worker(code: int, message: str | None = None, peer_failed: bool = False) -> None:
    """Ends a worker of several processes at once, without the shutdown barrier of
    jax.distributed (it would wait for processes that have failed). After an error that may
    come from a lost peer (`peer_failed`), it first gives the coordination service the time
    to name that process, which ends this worker through the supervisor's line."""
    if peer_failed:
        time.sleep(HEARTBEAT_TIMEOUT_S + 15)
    if message:
        print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

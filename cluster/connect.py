"""Connecting to Ray: an embedded local instance by default, or a running cluster."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import capfleet
from capfleet.core.errors import CapfleetError
from capfleet.core.storage import StorePath

# Ray maps loopback to the machine's interface address unless this is set; an embedded,
# single-machine instance has no reason to listen beyond loopback (docs/stack.md).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def use_loopback() -> None:
    """Make the Ray started by this process (and its workers) use 127.0.0.1 only.

    Ray reads the variable once, when it is first imported; if it already was, the constant it
    set is updated too (services.get_node_ip_address reads it at call time).
    """
    os.environ.update(LOOPBACK_ENV)
    if "ray" in sys.modules:
        import ray._private.ray_constants as constants

        constants.ENABLE_RAY_CLUSTER = False


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None):
    """Yields a connected Ray. Without an address a local instance is started on 127.0.0.1,
    sized to this machine (or `num_cpus`), and shut down at the end; with one (`auto`,
    `ray://host:10001`) the running cluster is joined and left running."""
    if address is None:
        use_loopback()  # before ray is imported here
    import ray

    if ray.is_initialized():  # already connected (a test session, a caller): reuse it
        yield ray
        return
    env = dict(capfleet.TF_ENV)  # every worker: Keras 2 before TensorFlow is imported
    if address is None:
        ray.init(
            address="local",  # a new instance: never whatever `ray start` left in /tmp/ray
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            runtime_env={"env_vars": {**env, **LOOPBACK_ENV}},
            log_to_driver=False,
            configure_logging=False,
        )
        nodes = {n["NodeManagerAddress"] for n in ray.nodes()}
        if nodes != {"127.0.0.1"}:
            ray.shutdown()
            raise CapfleetError(f"the embedded Ray left loopback: nodes on {sorted(nodes)}")
    else:
        # A driver that runs as a submitted job already has the job's runtime env (which
        # carries these variables, cluster/submit.py); Ray refuses a second one.
        submitted = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        runtime_env = None if submitted else {"env_vars": env}
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        except ConnectionError as e:
            raise CapfleetError(f"cannot reach a Ray cluster at {address!r} ({e})") from e
    try:
        yield ray
    finally:
        ray.shutdown()


@contextlib.contextmanager
def ray_messages_to(path: Path, verbose: bool = False):
    """Ray's own messages (start-up notices, operator dumps, warnings about actor arguments,
    deprecations; some written by its C++ core straight to the process's stderr) go to `path`
    instead of the console; with `verbose` they stay on the console. A job's own progress goes
    through its `log` (stdout) either way."""
    if verbose:
        yield
        return
    import tempfile
    import warnings

    store = isinstance(path, StorePath)  # no appends in an object store: a local file, then
    if store:  # the log object rewritten with it added at the end
        fd, name = tempfile.mkstemp(prefix="capfleet-log-")
        os.close(fd)
        file = Path(name)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        file = path
    sys.stderr.flush()
    saved = os.dup(2)
    with open(file, "ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # recorded in the log file, not hidden
            yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if store:
            try:
                before = path.read_bytes() if path.exists() else b""
                path.write_bytes(before + file.read_bytes())
            finally:
                file.unlink(missing_ok=True)


def failure_text(e: Exception) -> str:
    """What a task records for an exception it caught: the message of a CapfleetError (bad
    input), a short traceback of anything else (a bug)."""
    import traceback

    detail = str(e) if isinstance(e, CapfleetError) else traceback.format_exc(limit=3)
    return f"{type(e).__name__}: {detail}"


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def ray_imported() -> bool:
    """Import Ray now (so that nothing timed after pays for it); returns whether this process
    is already connected to a Ray (a shared session that later jobs reuse)."""
    import ray

    return ray.is_initialized()


def cluster_cpus(address: str | None) -> float:
    """The CPUs jobs run on: this machine's for the embedded Ray (no address), the cluster's
    when one is named."""
    if not address:
        return float(os.cpu_count() or 1)
    with ray_session(address) as ray:
        return float(ray.cluster_resources().get("CPU", 1))

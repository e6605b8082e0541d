"""A real `ray start --head` on loopback for the cluster tests: free ports of its own (the test
session's Ray may hold the defaults), its own process group, ended by that group's id."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
AGENT_PORTS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "ray-client-server-port",
)


_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free on loopback now and not handed out before in this session: a probe's port
    is free again once it closes, so two calls could give one port to two of Ray's components
    (seen: the GCS and metrics export, and Ray refused to start)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


@contextlib.contextmanager
def started_head(log: Path, env: dict, flags: list[str], ready, timeout_s: float = 90):
    """Start the head with `flags` besides the loopback and port ones; wait until `ready()`
    (polled each second) is true; yield its process; end its process group after."""
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
            *flags,
            *(f"--{flag}={free_port()}" for flag in AGENT_PORTS),
        ],
        env=env,
        start_new_session=True,  # its own process group: ended below by that group's id
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + timeout_s
        while not ready():
            if time.time() > deadline or proc.poll() is not None:
                raise AssertionError(log.read_text(errors="replace")[-3000:])
            time.sleep(1)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:  # `ray start --block` outlived 30 s of SIGTERM in each run seen: then kill the group
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

"""Submitting specs to a running Ray cluster through the Ray Jobs API, and managing the jobs.

`submit` stages the project's packages, pyproject.toml and the spec into a temporary folder that
Ray uploads as the job's working_dir; the entrypoint runs the spec with `--address auto` on the
cluster, so a submitted spec writes the same outputs as `capfleet run`. Paths in a submitted spec
are the cluster's paths (shared storage or object-store URIs).

Dependencies: a cluster whose image already holds capfleet's dependencies needs nothing more
(the KubeRay manifest in cluster/deploy does this); otherwise `install_deps` adds them as the
runtime environment's `pip` list, installed once per node by Ray.

Ray's token authentication stays on: the client reads the token (~/.ray/auth_token, or
RAY_AUTH_TOKEN) only when RAY_AUTH_MODE=token, so that is set here unless the caller chose.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from model.errors import CapfleetError

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jobs", "model", "compression", "cluster")
SPEC_NAME = "capfleet-spec.toml"
ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
AGENT_WAIT_S = 60

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _client(address: str):
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise CapfleetError(f"cannot reach the Ray Jobs API at {address!r} ({e})") from e


def dependencies() -> list[str]:
    """The project's runtime dependencies, as pyproject.toml pins them."""
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return list(doc["project"]["dependencies"])


def stage(spec: str | Path, into: Path) -> Path:
    """The folder Ray uploads: the packages (no caches), pyproject.toml, and the spec."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, into / pkg, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", into / "pyproject.toml")
    shutil.copy(spec, into / SPEC_NAME)
    return into


def submit(
    spec: str | Path,
    address: str,
    install_deps: bool = False,
    entrypoint_cpus: float = 0.0,
) -> str:
    """Submit a (validated) spec; returns the job's submission id."""
    client = _client(address)
    with tempfile.TemporaryDirectory(prefix="capfleet-submit-") as tmp:
        runtime_env: dict = {"working_dir": str(stage(spec, Path(tmp))), "env_vars": dict(ENV)}
        if install_deps:
            runtime_env["pip"] = dependencies()
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return client.submit_job(
                    entrypoint=f"python -m jobs.cli run {SPEC_NAME} --address auto",
                    runtime_env=runtime_env,
                    metadata={"capfleet_spec": Path(spec).name},
                    entrypoint_num_cpus=entrypoint_cpus or None,
                )
            except RuntimeError as e:
                # a head that has just started answers before its job agent is up
                if "No available agent" not in str(e) or time.monotonic() > deadline:
                    raise CapfleetError(f"the cluster at {address} refused the job: {e}") from e
                time.sleep(2)


def follow(address: str, job_id: str, write: Callable[[str], None]) -> str:
    """Stream a job's logs until it ends; returns its final status."""
    client = _client(address)

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    _call(job_id, lambda: asyncio.run(tail()))
    return client.get_job_status(job_id).value


def list_jobs(address: str) -> list[dict]:
    return [
        {
            "id": j.submission_id,
            "status": j.status.value,
            "entrypoint": j.entrypoint,
            "spec": (j.metadata or {}).get("capfleet_spec", ""),
            "start_time": j.start_time,
        }
        for j in _client(address).list_jobs()
    ]


def _call(job_id: str, fn):
    try:
        return fn()
    except RuntimeError as e:  # the Jobs API answers an unknown id with a RuntimeError
        raise CapfleetError(f"job {job_id}: {e}") from e


def status(address: str, job_id: str) -> str:
    client = _client(address)
    return _call(job_id, lambda: client.get_job_status(job_id).value)


def logs(address: str, job_id: str) -> str:
    client = _client(address)
    return _call(job_id, lambda: client.get_job_logs(job_id))


def stop(address: str, job_id: str) -> bool:
    client = _client(address)
    return _call(job_id, lambda: client.stop_job(job_id))

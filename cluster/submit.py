"""Submitting specs to a running Ray cluster through the Ray Jobs API, and managing the jobs.

`submit` stages the capfleet package (as it is installed here: capfleet/ with its core, model,
compression, cluster and jobs packages; never a secret beside them, NEVER_STAGED) and the spec
into a temporary folder that Ray uploads as the job's working_dir; the entrypoint (launch.sh)
runs `python -m capfleet run SPEC --address auto` with the Python the cluster's Ray workers run
in, so a submitted spec writes the same outputs as `capfleet run`. Paths in a submitted spec
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
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import capfleet
from capfleet.core.errors import CapfleetError

PACKAGE_ROOT = Path(capfleet.__file__).resolve().parent  # the repository root when editable
PACKAGE_FILES = ("__init__.py", "__main__.py")
SUBPACKAGES = ("core", "model", "compression", "cluster", "jobs")  # as pyproject ships them
# What never leaves this machine in a staged package, the launcher's rsync (deploy/aws.yaml's
# rsync_exclude) or a Docker build (.dockerignore): version control, environments, keys,
# tokens and credentials that may sit beside the code. Tests hold both files to this list.
NEVER_STAGED = (
    ".git",
    ".hg",
    ".svn",
    ".env",
    "*.env",
    ".env.*",
    ".envrc",
    ".netrc",
    ".aws",
    ".ssh",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "id_rsa*",
    "id_ed25519*",
    "id_ecdsa*",
    "*credentials*",
    "*secret*",
    "auth_token",
    "*.token",
    ".venv",
    "runs",
    "__pycache__",
    "*.pyc",
)
SPEC_NAME = "capfleet-spec.toml"  # launch.sh runs it by this name
LAUNCHER = "launch.sh"
ENTRYPOINT = f"sh {LAUNCHER}"
AGENT_WAIT_S = 60


def _client(address: str):
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise CapfleetError(f"cannot reach the Ray Jobs API at {address!r} ({e})") from e


def dependencies() -> list[str]:
    """The installed capfleet's runtime dependencies, as its metadata pins them."""
    from importlib.metadata import requires

    return [r for r in requires("capfleet") or [] if "extra ==" not in r]


def stage(spec: str | Path, into: Path) -> Path:
    """The folder Ray uploads: capfleet/ (the package, no caches), the spec and its launcher."""
    ignore = shutil.ignore_patterns(*NEVER_STAGED)
    pkg = into / "capfleet"
    pkg.mkdir(parents=True)
    for name in PACKAGE_FILES:
        shutil.copy(PACKAGE_ROOT / name, pkg / name)
    for sub in SUBPACKAGES:
        shutil.copytree(PACKAGE_ROOT / sub, pkg / sub, ignore=ignore)
    shutil.copy(spec, into / SPEC_NAME)
    shutil.copy(Path(__file__).with_name(LAUNCHER), into / LAUNCHER)
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
        runtime_env: dict = {
            "working_dir": str(stage(spec, Path(tmp))),
            "env_vars": dict(capfleet.TF_ENV),
        }
        if install_deps:
            runtime_env["pip"] = dependencies()
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return client.submit_job(
                    entrypoint=ENTRYPOINT,
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

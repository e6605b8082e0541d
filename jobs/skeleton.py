"""Every job's frame: the output folder made (or a clear error naming it), one writer at a time
(core.artifacts.OutputLock), a killed writer's temporary files removed, named steps timed, and
job.json written last with the spec, versions, start, end, seconds and the job's own counts.

    run = JobRun("compress", cfg.out, asdict(cfg), log)   # the clock starts here
    ...                                                   # checks before any work
    with run:                                             # OUT made, locked, leftovers gone
        with run.step("trials"):
            ...
        run.finish(trials=n, ...)                         # OUT/job.json
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from capfleet.cluster.connect import ray_messages_to, ray_session
from capfleet.core.artifacts import (
    OutputLock,
    package_versions,
    remove_leftovers,
    write_json_atomic,
)
from capfleet.core.errors import CapfleetError
from capfleet.core.storage import local

JOB_FILE = "job.json"
LOG_FILE = "capfleet.log"  # Ray's own messages go here, not to the console
VERSIONS = ("capfleet", "ray", "tensorflow", "ai-edge-litert", "pyarrow")


class JobRun:
    """One run of a job into `out`; see the module docstring."""

    def __init__(
        self,
        kind: str,
        out: str | Path,
        spec: dict,
        log: Callable[[str], None] = print,
        versions: Sequence[str] = VERSIONS,
        steps: Sequence[str] = (),
        nested: bool = False,
    ):
        self.kind, self.out, self.spec, self.log = kind, local(out), spec, log
        self.versions = tuple(versions)
        self.started = datetime.now(timezone.utc)
        self.t0 = time.perf_counter()
        self.seconds = dict.fromkeys(steps, 0.0)  # recorded even when a step does not run
        # nested: a job run by another job into the folder that one holds (the lock is held once)
        self._lock = OutputLock(self.out, f"{kind} job", log, nested)

    def __enter__(self) -> JobRun:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CapfleetError(
                f"{self.out}: cannot create the output folder ({e.strerror or e})"
            ) from e
        self._lock.__enter__()
        try:
            left = remove_leftovers(self.out)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        if left:
            self.log(f"{self.kind}: removed {left} temporary files left by a killed job")
        return self

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)

    @contextlib.contextmanager
    def step(self, name: str):
        """Time a named step (summed when it runs more than once); job.json records it."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t

    @contextlib.contextmanager
    def ray(self, address: str | None, verbose: bool = False):
        """A Ray session whose own messages (start-up notices, the token-authentication
        warning, deprecations) go to OUT/capfleet.log rather than the console."""
        with ray_messages_to(self.out / LOG_FILE, verbose), ray_session(address) as ray:
            yield ray

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.t0

    def finish(self, **fields) -> dict:
        """Write OUT/job.json (the frame's fields, then the job's own) and return its content."""
        job = {
            "kind": self.kind,
            "spec": self.spec,
            "versions": package_versions(*self.versions),
            "start": self.started.isoformat(timespec="seconds"),
            "end": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": round(self.wall, 2),
            **{f"{k}_seconds": round(v, 2) for k, v in self.seconds.items()},
            **fields,
        }
        write_json_atomic(self.out / JOB_FILE, job)
        return job

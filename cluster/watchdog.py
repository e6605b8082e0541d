"""A shard that takes too long ends its own worker: a hang in a decoder or a stalled read is
not interruptible from Python, so the worker process notes why and exits; the pipeline's
bounded retries then try the shard again, and a shard that keeps failing becomes error rows
with the reason the note gives (see capfleet.jobs.caption.job).

The tries are counted here, by the worker as it starts a shard, not by Ray: when an actor
dies, Ray retries every shard queued on it, and only the one it was running has used a try.
So an actor may hold a second shard beside the one it runs (fetching it, or waiting: no idle
gap between shards) without a poison shard using up an innocent neighbour's compute tries
(cluster/pool.py counts fetching and computing apart)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

from capfleet.core.artifacts import write_bytes_atomic
from capfleet.core.storage import StorePath, place

# OUT/_failed/shard-NNNNNN.json: why a shard's last attempt ended; shard-NNNNNN.MODEL.tries:
# how often a model's worker started it (removed once its part is written)
FAILED_DIR = "_failed"
TIMEOUT, WORKER_DIED, WORKER_ERROR = "timeout", "worker_died", "worker_error"
EXIT_CODE = 70


def note_path(out: str | Path, shard: int) -> Path:
    return place(out) / FAILED_DIR / f"shard-{shard:06d}.json"


def read_note(out: str | Path, shard: int) -> dict | None:
    try:
        note = json.loads(note_path(out, shard).read_text(encoding="utf-8"))
        return note if isinstance(note, dict) else None
    except (OSError, ValueError):
        return None


class WorkerFailure(RuntimeError):
    """A worker's own account of an exception (its message is the note's detail as it is)."""


def note_failure(out: str | Path, shard: int, reason: str, detail: str) -> None:
    """Why a shard's attempt failed, for the driver to put in its rows."""
    note = {"reason": reason, "detail": detail, "worker": f"{socket.gethostname()}:{os.getpid()}"}
    write_bytes_atomic(note_path(out, shard), json.dumps(note).encode())


def tries_path(out: str | Path, shard: int, stage: str) -> Path:
    return place(out) / FAILED_DIR / f"shard-{shard:06d}.{stage}.tries"


class OutOfTries(RuntimeError):
    """A shard that has used its tries: its worker passes it by, the driver writes its rows."""


def start_try(out: str | Path, shard: int, stage: str, tries: int) -> None:
    """Count one start of `stage` on the shard (a byte appended to its tries file, synced
    before the work starts, so a crash right after still counts); raises OutOfTries once it
    has been started `tries` times."""
    path = tries_path(out, shard, stage)
    if isinstance(path, StorePath):  # no appends in an object store: one object per start
        import secrets

        used = len(_store_tries(path))
        if used >= tries:
            raise OutOfTries(f"shard {shard}: {stage} started {used} times, its limit")
        (path.parent / f"{path.name}.{secrets.token_hex(8)}").write_bytes(b".")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        used = os.fstat(f.fileno()).st_size
        if used >= tries:
            raise OutOfTries(f"shard {shard}: {stage} started {used} times, its limit")
        f.write(b".")
        f.flush()
        os.fsync(f.fileno())


def tries_used(out: str | Path, shard: int, stage: str) -> int:
    """How many times the shard's `stage` has started since its last completed one (counting
    none)."""
    path = tries_path(out, shard, stage)
    if isinstance(path, StorePath):
        return len(_store_tries(path))
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def end_try(out: str | Path, shard: int, stage: str) -> None:
    """The shard's part is written: its count is no longer needed."""
    path = tries_path(out, shard, stage)
    for p in _store_tries(path) if isinstance(path, StorePath) else [path]:
        p.unlink(missing_ok=True)


def _store_tries(path: StorePath) -> list[StorePath]:
    return list(path.parent.glob(f"{path.name}.*"))


def clear_note(out: str | Path, shard: int) -> None:
    """A fresh start for the shard: no note, no tries used."""
    note_path(out, shard).unlink(missing_ok=True)
    for path in (place(out) / FAILED_DIR).glob(f"shard-{shard:06d}.*.tries*"):
        path.unlink(missing_ok=True)


def clear_notes(out: str | Path, shards) -> None:
    """clear_note for many shards, from one listing of the notes (an object store answers
    each request in milliseconds, not microseconds)."""
    wanted = {f"shard-{s:06d}" for s in shards}
    folder = place(out) / FAILED_DIR
    for path in folder.glob("shard-*") if wanted else ():
        if path.name.split(".", 1)[0] in wanted:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def deadline(out: str | Path, shard: int, stage: str, seconds: float):
    """Within `seconds`, or this process notes a timeout for the shard and exits."""

    def expire() -> None:
        note = {
            "reason": TIMEOUT,
            "stage": stage,
            "seconds": seconds,
            "worker": f"{socket.gethostname()}:{os.getpid()}",
            "time": time.time(),
        }
        try:
            write_bytes_atomic(note_path(out, shard), json.dumps(note).encode())
        finally:
            os._exit(EXIT_CODE)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()

"""Small helpers for artifacts on disk: atomic writes (bytes, JSON, Parquet), versioned JSON
manifests, package versions."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

from capfleet.core.errors import CapfleetError

TMP_PREFIX = ".tmp-"  # a writer's file before its rename; one left behind is a killed writer's


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write under a temporary name in the same folder, flush it to disk, then rename: a reader
    (or a rerun after a crash or power loss) sees the whole file or none. The file gets the
    permissions an ordinary new file gets (umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TMP_PREFIX}{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable: the folder's entry is flushed too (where the OS allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_leftovers(folder: str | Path) -> int:
    """Delete the temporary files that killed writers left under `folder`; returns how many.
    Call it only while holding the folder's OutputLock (a live writer's file looks the same)."""
    removed = 0
    for p in Path(folder).rglob(f"{TMP_PREFIX}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed += 1
    return removed


def write_json_atomic(path: str | Path, data: dict) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=1) + "\n").encode("utf-8"))


def write_parquet_atomic(path: str | Path, table) -> None:
    """A Parquet file that readers see whole or not at all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes_atomic(path, sink.getvalue().to_pybytes())


def read_manifest_json(path: Path, fmt: str, error: type[CapfleetError], what: str) -> dict:
    """A manifest written by capfleet, checked for its format; `error` names the problem."""
    if not path.is_file():
        raise error(f"{path.parent}: not a capfleet {what} (no {path.name})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise error(f"{path}: format {got!r}, expected {fmt}")
    return manifest


LOCK_FILE = ".capfleet.lock"
LOCK_HEARTBEAT_S = 20.0  # the holder touches the lock this often...
LOCK_STALE_S = 120.0  # ...so one untouched for this long was left by a killed job


class OutputLock:
    """One writer per output folder: OUT/.capfleet.lock names its holder (host:pid, start). A
    second job into the same folder is refused; a lock whose holder is gone (a dead pid on this
    host, or no heartbeat for LOCK_STALE_S from any host) is taken over."""

    def __init__(self, folder: str | Path, what: str = "job", log=print):
        self.path = Path(folder) / LOCK_FILE
        self.what, self.log = what, log
        self._stop = None

    def __enter__(self) -> OutputLock:
        import socket
        import threading
        import time

        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_umask())
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    since = time.strftime(
                        "%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0))
                    )
                    raise CapfleetError(
                        f"{self.path.parent}: another {self.what} is writing here "
                        f"({holder.get('host')}:{holder.get('pid')}, since {since}); wait for "
                        f"it, or use another output folder"
                    ) from None
                self.log(f"{self.what}: taking over the lock of a job that is gone ({holder})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            break
        else:
            raise CapfleetError(f"{self.path}: could not take the output lock")
        self._me = me
        self._stop = threading.Event()
        threading.Thread(target=self._heartbeat, daemon=True).start()
        return self

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict) -> bool:
        import socket
        import time

        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True  # that process is gone
            except PermissionError:
                pass  # alive, another user's
            return False
        return age > LOCK_STALE_S

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._holder().get("pid") == self._me["pid"]:
            self.path.unlink(missing_ok=True)


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of the named distributions (and Python), for manifests."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = "absent"
    return out


INT8_FLAGS = {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"}


def cpu_info() -> dict:
    """This machine's CPU: its model, cores and the instructions int8 speed depends on. With
    VNNI (avx512_vnni, avx_vnni) or AMX, int8 matrix products run several times faster than
    fp32; with AVX2 alone they are no faster (so every latency figure says which it ran on)."""
    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        kind = "vnni"
    else:
        kind = "avx2-only" if "avx2" in flags else "other"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "int8_instructions": sorted(flags & INT8_FLAGS),
        "int8_kind": kind,
    }

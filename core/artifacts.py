"""Small helpers for artifacts on disk: atomic writes (bytes, JSON, Parquet), versioned JSON
manifests, package versions."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from pathlib import Path

from capfleet.core.errors import CapfleetError
from capfleet.core.storage import StorePath, place

TMP_PREFIX = ".tmp-"  # a writer's file before its rename; one left behind is a killed writer's


def _umask() -> int:
    """The process's umask, read without changing it (os.umask can only set it, and setting
    it even for a moment lets another thread create a world-writable file)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


def _umask_at_import() -> int:
    mask = os.umask(0o022)  # at import, before any thread of ours writes a file
    os.umask(mask)
    return mask


_IMPORT_UMASK = _umask_at_import()  # where /proc cannot tell (not Linux)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write under a temporary name in the same folder, flush it to disk, then rename: a reader
    (or a rerun after a crash or power loss) sees the whole file or none. The file gets the
    permissions an ordinary new file gets (umask), not mkstemp's private 0600. An object in a
    store (core.storage) is one upload, which the store publishes whole."""
    if isinstance(place(path), StorePath):
        place(path).write_bytes(data)
        return
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
    Call it only while holding the folder's OutputLock (a live writer's file looks the same).
    An object store holds none: its uploads appear whole or not at all."""
    if isinstance(place(folder), StorePath):
        return 0
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


# (the format found, the one expected) -> what to say: a folder of the other kind
OTHER_KIND_HINTS = {
    ("capfleet-model/1", "capfleet-bundle/1"): (
        ": this is a trained model directory, not a bundle; make a bundle of it with "
        "`capfleet export MODEL --out BUNDLE` (or `capfleet compress`)"
    ),
    ("capfleet-bundle/1", "capfleet-model/1"): (
        ": this is a bundle, not a trained model directory; compress and export take the "
        "model directory `capfleet train` wrote"
    ),
}


def read_manifest_json(
    path: Path | StorePath, fmt: str, error: type[CapfleetError], what: str
) -> dict:
    """A manifest written by capfleet, checked for its format; `error` names the problem and,
    for a folder of capfleet's other kind (a model directory given as a bundle), what to run."""
    if not path.parent.exists():
        raise error(f"{path.parent}: no such folder (expected a capfleet {what})")
    if not isinstance(path, StorePath) and not path.parent.is_dir():
        raise error(f"{path.parent}: a file, not a folder (expected a capfleet {what})")
    if not path.is_file():
        raise error(f"{path.parent}: not a capfleet {what} (no {path.name})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise error(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        hint = OTHER_KIND_HINTS.get((str(got), fmt), "")
        raise error(f"{path}: format {got!r}, expected {fmt}{hint}")
    return manifest


LOCK_FILE = ".capfleet.lock"
LOCK_HEARTBEAT_S = 20.0  # the holder touches the lock this often...
LOCK_STALE_S = 120.0  # ...so one untouched for this long was left by a killed job
STORE_SETTLE_S = 1.0  # an object-store lock is read back this long after it is written


class OutputLock:
    """One writer per output folder: OUT/.capfleet.lock names its holder (host, pid, a random
    token, start) and its mtime is the holder's heartbeat, touched every LOCK_HEARTBEAT_S.

    - A second job into the folder is refused while the lock lives. A lock is stale when its
      heartbeat is older than LOCK_STALE_S, whoever holds it (a live pid with an old heartbeat
      is no holder: a container restarted as PID 1 again), or at once when its holder ran on
      this host, in this PID namespace and boot, and that pid is gone.
    - A stale lock is taken over under a take-over mutex (an O_EXCL file beside it): the new
      lock replaces the old by rename, then is read back; two jobs that both find the same
      stale lock cannot both enter.
    - The holder's token, not its pid, says whose lock it is: release removes only one's own.
    - A heartbeat that fails (the lock taken over or removed, or unreadable or unwritable for
      half of LOCK_STALE_S) interrupts the thread that took the lock (as Ctrl-C would), and
      the job ends with a CapfleetError naming the cause rather than writing on unlocked.
    - A job that runs other jobs into the folder it holds (the goal search) opens their locks
      with `nested=True`: held once, released by the outermost. Without it, a second lock on
      a folder this process holds is refused like any other writer.

    On an object store (a StorePath) there is no atomic create through pyarrow's filesystems:
    the lock is written, then read back after STORE_SETTLE_S; of two jobs that start within
    that time, the one whose write landed last enters and the other is refused, but one whose
    write lands later than that after the other's check can enter beside it. So it keeps out
    a second job started while one runs, not two started in the same second. On a file system
    without atomic O_EXCL and rename (some NFS setups) it is best effort too."""

    _held: dict[str, int] = {}  # resolved lock path -> depth, this process

    def __init__(self, folder: str | Path, what: str = "job", log=print, nested: bool = False):
        self.path = place(folder) / LOCK_FILE
        self.store = isinstance(self.path, StorePath)
        self.what, self.log, self.nested = what, log, nested
        self._stop = None
        self.lost: str | None = None

    def __enter__(self) -> OutputLock:
        import secrets
        import socket
        import threading
        import time

        key = str(self.path.resolve())  # a StorePath resolves to itself
        if self.nested and key in OutputLock._held:
            OutputLock._held[key] += 1
            self._key = key
            return self
        me = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": secrets.token_hex(16),
            "started": time.time(),
            "namespace": _namespace(),
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create(me):
                break
            holder = self._holder()
            if not self._stale(holder):
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
                raise CapfleetError(
                    f"{self.path.parent}: another {self.what} is writing here "
                    f"({holder.get('host')}:{holder.get('pid')}, since {since}); wait for "
                    f"it, or use another output folder"
                )
            if self._take_over(holder, me):
                self.log(f"{self.what}: taking over the lock of a job that is gone ({holder})")
                break
        else:
            raise CapfleetError(f"{self.path}: could not take the output lock")
        self._me, self._key = me, key
        OutputLock._held[key] = 1
        self._stop = threading.Event()
        self._owner = threading.current_thread()  # the job's thread, interrupted if it is lost
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()
        return self

    def _write_tmp(self, me: dict) -> Path:
        tmp = self.path.with_name(f"{TMP_PREFIX}{LOCK_FILE}.{me['token']}")
        tmp.write_text(json.dumps(me))
        os.chmod(tmp, 0o666 & ~_umask())
        return tmp

    def _create(self, me: dict) -> bool:
        """Create the lock if there is none (link is atomic create-if-absent)."""
        if self.store:
            return not self.path.exists() and self._store_write(me)
        tmp = self._write_tmp(me)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, stale: dict, me: dict) -> bool:
        """Replace the stale lock with ours under the take-over mutex; True when ours is the
        lock now (read back), False when another job's is (it got there first: look again)."""
        import time

        if self.store:
            return self._holder().get("token") == stale.get("token") and self._store_write(me)
        mutex = self.path.with_name(f"{LOCK_FILE}.takeover")
        try:
            if time.time() - mutex.stat().st_mtime > LOCK_STALE_S:
                mutex.unlink(missing_ok=True)  # a taker killed inside the few lines below
        except FileNotFoundError:
            pass
        try:
            fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~_umask())
        except FileExistsError:
            time.sleep(0.2)  # another job is taking it over: look again
            return False
        os.close(fd)
        try:
            if self._holder().get("token") != stale.get("token"):
                return False  # not the lock we found stale any more
            os.replace(self._write_tmp(me), self.path)
            return self._holder().get("token") == me["token"]
        finally:
            mutex.unlink(missing_ok=True)

    def _store_write(self, me: dict) -> bool:
        """Write the lock object, wait, read it back: True when it is still ours."""
        import time

        self.path.write_bytes(json.dumps(me).encode())
        time.sleep(STORE_SETTLE_S)
        return self._holder().get("token") == me["token"]

    def _age(self) -> float:
        """Seconds since the holder's last heartbeat; FileNotFoundError when there is no lock."""
        import time

        if self.store:
            mtime = self.path.mtime() if self.path.exists() else None
            if mtime is None:
                raise FileNotFoundError(str(self.path))
            return time.time() - mtime
        return time.time() - self.path.stat().st_mtime

    def _touch(self) -> None:
        if self.store:
            self.path.write_bytes(json.dumps(self._me).encode())  # a new object: a new mtime
        else:
            os.utime(self.path)

    def _holder(self) -> dict:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict) -> bool:

        try:
            age = self._age()
        except FileNotFoundError:
            return True
        if age > LOCK_STALE_S:
            return True
        here = holder.get("namespace") == _namespace() and holder.get("host") == _host()
        if here and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True  # that process is gone
            except PermissionError:
                pass  # alive, another user's
        return False

    def _heartbeat(self) -> None:
        import time

        last_ok = time.time()
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                token = json.loads(self.path.read_text(encoding="utf-8")).get("token")
                if token == self._me["token"]:
                    self._touch()
                    last_ok = time.time()
                    continue
                self.lost = "its lock was taken by another job"
            except FileNotFoundError:
                self.lost = "its lock was removed"
            except (OSError, ValueError, AttributeError) as e:
                if time.time() - last_ok < LOCK_STALE_S / 2:
                    continue  # a passing hiccup (a read or write that failed): not stale yet
                self.lost = f"its lock could not be kept ({getattr(e, 'strerror', None) or e})"
            if self._stop.is_set():  # the job ended meanwhile: nothing to stop
                return
            self.log(f"{self.what}: stopping: {self.lost} ({self.path})")
            _interrupt(self._owner)
            return

    def __exit__(self, exc_type, *exc) -> None:
        depth = OutputLock._held.get(self._key, 0)
        if depth > 1:
            OutputLock._held[self._key] = depth - 1
            return
        OutputLock._held.pop(self._key, None)
        self._stop.set()
        self._beat.join()  # no heartbeat after this: it could find the lock gone below
        if self._holder().get("token") == self._me["token"]:
            self.path.unlink(missing_ok=True)
        if self.lost:
            raise CapfleetError(f"{self.path.parent}: the {self.what} stopped: {self.lost}")


def _interrupt(thread) -> None:
    """Raise KeyboardInterrupt in `thread` (the job's), as Ctrl-C would: a signal for the main
    thread (it also wakes a blocking call), an asynchronous exception for another."""
    import ctypes
    import signal
    import threading

    if thread is threading.main_thread():
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.pthread_kill(thread.ident, signal.SIGINT)
            return
        import _thread

        _thread.interrupt_main()
        return
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread.ident), ctypes.py_object(KeyboardInterrupt)
    )


def _host() -> str:
    import socket

    return socket.gethostname()


def _namespace() -> str:
    """This process's PID namespace and boot: where a pid names the same process."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{ns} {boot}"
    except OSError:
        return ""


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

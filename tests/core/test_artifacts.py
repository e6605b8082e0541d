"""The output lock, contended by real processes, and atomic writes that never touch the umask."""

import json
import multiprocessing
import os
import time

import pytest

from capfleet.core import artifacts
from capfleet.core.artifacts import LOCK_FILE, OutputLock, write_bytes_atomic
from capfleet.core.errors import CapfleetError


def _lock(out, **holder) -> None:
    """A lock file as another job would have left it."""
    base = {"host": "elsewhere", "pid": 1, "token": "theirs", "started": 0, "namespace": "other"}
    (out / LOCK_FILE).write_text(json.dumps({**base, **holder}))


def _age(out, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(out / LOCK_FILE, (t, t))


def test_a_live_holder_is_refused_and_an_old_heartbeat_is_no_holder(tmp_path):
    _lock(tmp_path, host=os.uname().nodename, pid=os.getpid())  # alive, in another namespace
    with pytest.raises(CapfleetError, match="another job is writing here"):
        OutputLock(tmp_path).__enter__()
    _age(tmp_path, artifacts.LOCK_STALE_S + 5)  # a live pid, but no heartbeat: a restarted
    lines: list = []  # container's PID 1 is not the job that left this lock
    with OutputLock(tmp_path, log=lines.append):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] != "theirs"
    assert any("taking over" in line for line in lines)
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_dead_pid_counts_only_in_the_same_pid_namespace(tmp_path):
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    host = os.uname().nodename
    _lock(tmp_path, host=host, pid=dead)  # same host name, another PID namespace: its pid
    with pytest.raises(CapfleetError):  # says nothing here, so the fresh heartbeat rules
        OutputLock(tmp_path).__enter__()
    _lock(tmp_path, host=host, pid=dead, namespace=artifacts._namespace())
    with OutputLock(tmp_path):
        pass


def _contend(out: str, start, results) -> None:
    start.wait()
    try:
        with OutputLock(out, log=lambda _: None):
            results.put("in")
            time.sleep(1.5)  # held while the others try
    except CapfleetError:
        results.put("refused")


def test_racing_jobs_cannot_both_take_over_a_stale_lock(tmp_path):
    _lock(tmp_path)
    _age(tmp_path, artifacts.LOCK_STALE_S + 5)
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), start, results)) for _ in range(4)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes == ["in", "refused", "refused", "refused"]


def test_release_removes_only_ones_own_lock_and_a_lost_lock_stops_the_job(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "LOCK_HEARTBEAT_S", 0.1)
    lines: list = []
    with pytest.raises(CapfleetError, match="taken by another job"):
        with OutputLock(tmp_path, "caption job", log=lines.append):
            _lock(tmp_path)  # another job took it over
            deadline = time.time() + 10
            while time.time() < deadline:  # writing on: the heartbeat must stop this
                time.sleep(0.05)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "theirs"  # not removed
    assert any("stopping" in line for line in lines)


def test_the_lock_is_held_once_by_a_job_that_runs_jobs_into_it(tmp_path):
    with OutputLock(tmp_path):
        with OutputLock(tmp_path, nested=True):  # the goal search's compress jobs
            pass
        assert (tmp_path / LOCK_FILE).exists()
        with pytest.raises(CapfleetError, match="another job is writing here"):
            OutputLock(tmp_path).__enter__()  # not nested: another writer, even in-process
    assert not (tmp_path / LOCK_FILE).exists()


def test_atomic_writes_never_set_the_umask(tmp_path, monkeypatch):
    mask = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda *_: pytest.fail("os.umask called"))
        write_bytes_atomic(tmp_path / "f", b"x")
        assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640
    finally:
        monkeypatch.undo()
        os.umask(mask)


def test_a_lost_lock_stops_a_job_run_in_another_thread(tmp_path, monkeypatch):
    import threading

    monkeypatch.setattr(artifacts, "LOCK_HEARTBEAT_S", 0.1)
    outcome: list = []

    def job():
        try:
            with OutputLock(tmp_path, "caption job", log=lambda _: None):
                _lock(tmp_path)
                for _ in range(200):  # writing on, in small steps, for up to 10 s
                    time.sleep(0.05)
            outcome.append("wrote on unlocked")
        except CapfleetError as e:
            outcome.append(str(e))

    worker = threading.Thread(target=job)
    worker.start()
    worker.join(15)
    assert outcome and "taken by another job" in outcome[0]

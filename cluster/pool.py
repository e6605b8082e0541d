"""Units of work through a pool of Ray actors: the executor the caption job and the feature job
both run on. It knows no job. It is handed the units (plain dicts, each with an integer `unit`
id), the worker class that maps one unit (with the `node` it runs on added) to a result dict
(Ray's batch-inference shape: load once in `__init__`, map in `__call__`, no Ray code, so a
test calls it on a hand-built unit), and optionally a `prepare` function run as tasks of their
own before the actors. Call it inside a `ray_session` (cluster/connect.py).

The pool is plain Ray actors, one per `cpus` the cluster has (or `actors`), fed by a loop in
the driver that keeps each actor `in_flight` units deep and hands the next unit to whichever
actor frees a place first. Ray Data's actor pool did the same with a streaming executor, a
driver loop and three helper actors of its own: about 4% of a 2-core machine over a job, and
2 s more to start (bench/README.md, caption_scale). Once no unit waits, an idle actor is ended:
its CPUs may be what an actor restarted after losing its node needs to run the units Ray
retries on it. A unit that comes back after that (its actor lost for good) gets a fresh
actor.

A worker may split a unit's work in two: `fetch(unit)` (waiting on disks, stores and hosts)
returns what `__call__` then computes. With `Pool.overlap` each actor runs two units at once,
each in its own thread: one unit's fetch overlaps the other's compute, and computes run one at
a time, so the next shard's bytes arrive while the current one is captioned; a third unit
waits queued on the actor, so the next fetch starts the moment a compute ends.

Fault policy, the same for every job:
- each unit's starts are counted on disk by the actor that starts it (cluster/watchdog.py), so
  a unit that kills every worker it lands on (out of memory, a native crash) is passed by after
  `tries` starts, and one queued behind it on a dead actor loses no try. The two phases are
  counted apart, each with `tries`, when each begins. A unit that has fetched and waits for
  the compute spends no try when its neighbour kills the actor; one still fetching spends a
  fetch try. An actor runs its first unit alone (fetch and compute), and overlaps only once
  one unit has come through: the units Ray retries on a restarted actor run one after the
  other, so a poison shard cannot spend, try after try, the fetch tries of the shard it is
  retried beside (at most one, the first time), and a unit whose compute tries are spent is
  passed by before its fetch. A fetch that runs past its deadline ends the actor too, and so
  costs the unit computing beside it a try; per-request deadlines leave that to a store or
  host that hangs for the whole deadline;
- a dead actor is always restarted and Ray retries what was queued on it; an actor whose
  worker does not load (a bundle it cannot read) is ended, named in the log, and its units go
  to the others: at its start the pool asks it, after a restart it leaves for good itself
  (Ray would otherwise hand it unit after unit). Once no actor is left the job fails with
  that reason, as it does when none has started after WAIT_FOR_ACTORS_S (a cluster with no
  room for one). With a prepare stage the pool leaves room for its tasks;
- a worker's exception is noted with the unit (a bug: the rows say what it was) and the unit is
  dropped, not the job; a worker may also end its own process past a deadline
  (watchdog.deadline);
- `run_units` returns every unit that produced no result with the reason its note gives, for
  the job to record as error rows.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from capfleet.cluster.connect import first_line
from capfleet.cluster.watchdog import (
    TIMEOUT,
    WORKER_DIED,
    WORKER_ERROR,
    OutOfTries,
    WorkerFailure,
    clear_notes,
    end_try,
    note_failure,
    read_note,
    start_try,
    tries_used,
)
from capfleet.core.errors import CapfleetError

WAIT_FOR_ACTORS_S = 600  # the job gives up when no actor of its pool has started by then
UNIT_STAGE = "unit"  # the name a unit's starts are counted under (_failed/shard-N.unit.tries)
FETCH_STAGE = "fetch"  # and its fetches' (a worker with a fetch phase)


@dataclass(frozen=True)
class Pool:
    """What runs the units: `worker(**kwargs)` per actor of `cpus` CPUs; `actors` pins the
    pool's size, 0 sizes it to the cluster's CPUs; `notes` is the folder where tries and
    failure notes are kept (every node must see it); `prepare(unit, **prepare_kwargs)` runs as
    tasks of `prepare_cpus` before the actors when given."""

    worker: type
    kwargs: dict
    notes: str
    cpus: float = 1.0
    actors: int = 0
    tries: int = 3
    in_flight: int = 2  # units given to an actor at once: the next one waits queued
    overlap: bool = False  # the worker's fetch(unit) runs beside another unit's compute
    prepare: Callable | None = None
    prepare_kwargs: dict = field(default_factory=dict)
    prepare_cpus: float = 1.0


def pool_size(pool: Pool, units: int | None = None) -> int:
    """How many actors: `actors` pins it; otherwise as many as the cluster's CPUs hold (and no
    more than units), at least one. An actor larger than every node could never be placed:
    refused here rather than waited for."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    largest = max((n.get("Resources", {}).get("CPU", 0) for n in nodes), default=0)
    asks = {"worker": pool.cpus, **({"prepare": pool.prepare_cpus} if pool.prepare else {})}
    for what, cpus in asks.items():
        if cpus > largest:
            raise CapfleetError(
                f"a {what} of {cpus:g} CPUs, but the largest node has {largest:g}: "
                "no actor could ever start"
            )
    if pool.actors:
        return pool.actors
    cpus = float(ray.cluster_resources().get("CPU", 1))
    if pool.prepare:  # room for the prepare tasks, or the actors would wait on them forever
        cpus -= pool.prepare_cpus
    most = max(1, int(cpus // pool.cpus))
    return min(most, units) if units else most


def run_units(
    units: list[dict],
    pool: Pool,
    on_result: Callable[[dict], None] = lambda _: None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[int, str]:
    """Run every unit through the pool; `on_result` sees each result as it arrives (with the
    `node` that computed it), `log` each actor the pool loses for good. Returns {unit id:
    why} for the units that produced none."""
    if not units:
        return {}
    clear_notes(pool.notes, [int(u["unit"]) for u in units])  # a fresh start: no tries used
    feeder = _Feeder(pool, pool_size(pool, len(units)), len(units), log)
    try:
        done = feeder.run(units, on_result)
    finally:
        feeder.end()
    missing = [int(u["unit"]) for u in units if int(u["unit"]) not in done]
    return {u: why_failed(pool.notes, u, pool.tries) for u in missing}


class _Feeder:
    """The driver's side of the pool: starts the actors, keeps each one `depth` units deep as
    results come back, moves the units of an actor lost for good to the others."""

    def __init__(self, pool: Pool, size: int, units: int, log: Callable[[str], None]):
        import ray

        calls = 2 if pool.overlap else 1  # units an actor runs at once (module docstring)
        # no deeper than an even share: the actors that start first leave units for the rest
        self.depth = min(pool.in_flight + calls - 1, math.ceil(units / size))
        self.log = log
        # named after the worker, so Ray's dashboard and state API show the CaptionWorker
        cls = type(pool.worker.__name__, (_Actor,), {"__module__": _Actor.__module__})
        actor = ray.remote(cls).options(
            num_cpus=pool.cpus,
            max_concurrency=calls,
            # a dead actor is always restarted (module docstring) and Ray retries the units
            # queued on it; the tries are counted by _Actor
            max_restarts=-1,
            max_task_retries=-1,
        )
        self.args = (pool.worker, pool.kwargs, pool.notes, pool.tries, pool.overlap)
        self.actor, self.size, self.made = actor, size, 0
        self.actors: dict = {}  # index -> handle, of the actors not ended
        self.starting: dict = {}  # ObjectRef of started() -> actor, until it answers
        self.ready: list[int] = []  # actors that have started, in the order they did
        self.started = False  # whether any actor has
        self.load: dict[int, int] = {}  # units each actor holds
        for _ in range(size):
            self._start()
        self.prepare = None
        if pool.prepare is not None:  # tried as often as the actors' units
            self.prepare = ray.remote(_prepared).options(
                num_cpus=pool.prepare_cpus, max_retries=pool.tries - 1
            )
        self.pool = pool

    def run(self, units: list[dict], on_result: Callable[[dict], None]) -> set[int]:
        import ray

        queue = deque(units)
        running: dict = {}  # ObjectRef -> (actor, unit)
        done: set[int] = set()
        lost = ""  # why the last actor the pool lost for good went
        deadline = time.monotonic() + WAIT_FOR_ACTORS_S
        while queue or running:
            if queue and not self.actors and self.made < 2 * self.size:
                self._start()  # units came back after the tail ended the idle actors
            self._feed(queue, running)
            if not self.actors:
                raise CapfleetError(
                    f"no worker {'is left' if self.started else 'could start'}: {lost}"
                )
            if not self.started and time.monotonic() > deadline:
                raise CapfleetError(
                    f"no worker started in {WAIT_FOR_ACTORS_S} s: the cluster has no room "
                    f"for an actor of {self.pool.cpus:g} CPUs"
                )
            finished, rest = ray.wait([*running, *self.starting], num_returns=1, timeout=10)
            if finished and rest:  # and whatever else is done by now, in one call
                finished += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in finished:
                if ref in self.starting:
                    i = self.starting.pop(ref)
                    try:
                        why = ray.get(ref)  # None, or why its worker could not load
                    except ray.exceptions.RayError as e:
                        why = first_line(e)
                    if why is None:
                        self.ready.append(i)
                        self.started = True
                    else:
                        lost = self._lose(i, why)
                    continue
                i, unit = running.pop(ref)
                if i in self.load:
                    self.load[i] -= 1
                try:
                    result = ray.get(ref)
                except ray.exceptions.ActorDiedError as e:
                    # gone for good (its worker no longer loads after a restart): the unit
                    # goes to another actor, its tries counted as they were
                    queue.appendleft(unit)
                    if i in self.actors:
                        lost = self._lose(i, first_line(e))
                    continue
                except ray.exceptions.RayError:  # noted by the actor: why_failed says why
                    continue
                done.add(int(result["unit"]))
                on_result(result)
            if not queue:  # the tail: an idle actor frees its CPUs (a restarted one's units
                for i in [i for i in self.actors if not self.load[i]]:  # may need them)
                    self._end(i)
        return done

    def _start(self) -> None:
        i, self.made = self.made, self.made + 1
        self.actors[i] = self.actor.remote(*self.args)
        self.starting[self.actors[i].started.remote()] = i
        self.load[i] = 0

    def _lose(self, i: int, why: str) -> str:
        self.log(f"a worker of the pool is lost for good: {why}")
        self._end(i)
        return why

    def _feed(self, queue: deque, running: dict) -> None:
        """Give each started actor units until it holds `depth`, the least loaded first."""
        while queue:
            free = [i for i in self.ready if self.load[i] < self.depth]
            if not free:
                return
            i = min(free, key=lambda j: self.load[j])
            unit = queue.popleft()
            arg = unit
            if self.prepare is not None:  # Ray runs it before handing the actor its result
                kw = self.pool.prepare_kwargs
                arg = self.prepare.remote(unit, self.pool.prepare, kw, self.pool.notes)
            running[self.actors[i].__call__.remote(arg)] = (i, unit)
            self.load[i] += 1

    def _end(self, i: int) -> None:
        import ray

        ray.kill(self.actors.pop(i))
        if i in self.ready:
            self.ready.remove(i)
        self.starting = {ref: j for ref, j in self.starting.items() if j != i}
        self.load.pop(i)

    def end(self) -> None:
        for i in list(self.actors):
            self._end(i)


def why_failed(notes: str | Path, unit: int, tries: int) -> str:
    """The recorded reason a unit produced no result, from its note."""
    note = read_note(notes, unit) or {}
    if note.get("reason") == TIMEOUT:
        return f"{TIMEOUT}: {note.get('stage')} ran over {note.get('seconds')} s"
    if note.get("reason") == WORKER_ERROR:  # a bug: the job's log has the traceback
        return f"{WORKER_ERROR}: {note.get('detail')}"
    return f"{WORKER_DIED}: its worker died on each of {tries} attempts"


def _prepared(unit: dict, fn: Callable, kwargs: dict, notes: str) -> dict:
    try:
        return fn(unit, **kwargs)
    except Exception as e:  # a bug, not a bad input: noted, as _Actor notes its worker's
        detail = str(e) if isinstance(e, WorkerFailure) else f"{type(e).__name__}: {e}"
        note_failure(notes, int(unit["unit"]), WORKER_ERROR, detail)
        raise


class _Actor:
    """One actor of the pool: the worker, loaded once; counts each unit's starts of each phase
    and lets one unit compute at a time (module docstring)."""

    def __init__(self, worker: type, kwargs: dict, notes: str, tries: int, overlap: bool):
        import ray

        self.problem = None
        try:
            self.worker = worker(**kwargs)
        except Exception as e:  # the pool asks started(), ends this actor and says why
            detail = str(e) if isinstance(e, CapfleetError) else f"{type(e).__name__}: {e}"
            self.problem = first_line(Exception(detail))
        self.overlap = overlap
        self.computing = threading.Lock()
        self.proven = False  # a unit has come through this process: fetches may overlap
        self.notes, self.tries = notes, tries
        self.node = ray.get_runtime_context().get_node_id()

    def started(self) -> str | None:
        """None once the worker has loaded; else why it could not."""
        return self.problem

    def __call__(self, unit: dict) -> dict:
        if self.problem is not None:  # restarted, and its worker no longer loads: Ray would
            import ray  # hand it unit after unit, so it leaves for good (the pool moves them)

            ray.actor.exit_actor()
        unit = dict(unit)  # the worker may let parts of its own copy go
        uid = int(unit["unit"])
        if self.overlap and not self.proven:
            # Ray retries a unit on its restarted (so unproven) actor: one whose computes
            # ended every process they ran in is passed by before its fetch
            if tries_used(self.notes, uid, UNIT_STAGE) >= self.tries:
                raise OutOfTries(f"unit {uid}: {UNIT_STAGE} started {self.tries} times")
        fetched = self.overlap and self.proven
        if fetched:  # beside the other unit's compute
            unit = self._phase(uid, FETCH_STAGE, self.worker.fetch, unit)
        unit["node"] = self.node
        with self.computing:
            if self.overlap and not fetched:  # this process's first unit(s): one at a time
                unit = self._phase(uid, FETCH_STAGE, self.worker.fetch, unit)
            result = self._phase(uid, UNIT_STAGE, self.worker, unit)
            self.proven = True
        return {**result, "unit": uid, "node": self.node}

    def _phase(self, uid: int, stage: str, fn: Callable, unit: dict) -> dict:
        start_try(self.notes, uid, stage, self.tries)  # raises once its tries are spent
        try:
            result = fn(unit)
        except Exception as e:  # a bug, not a bad input: noted, so the job can say what it was
            detail = str(e) if isinstance(e, WorkerFailure) else f"{type(e).__name__}: {e}"
            note_failure(self.notes, uid, WORKER_ERROR, detail)
            raise
        end_try(self.notes, uid, stage)
        return result

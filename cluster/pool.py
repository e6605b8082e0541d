"""Units of work through a pool of Ray Data actors: the executor the caption job and the feature
job both run on. It knows no job. It is handed the units (plain dicts, each with an integer
`unit` id), the worker class that maps one unit (with the `node` it runs on added) to a result
dict (Ray's batch-inference shape: load once in `__init__`, map in `__call__`, no Ray code, so
a test calls it on a hand-built unit), and optionally a `prepare` function run as tasks of
their own before the actors. Call it inside a `ray_session` (cluster/connect.py).

A worker may split a unit's work in two: `fetch(unit)` (waiting on disks, stores and hosts)
returns what `__call__` then computes. With `Pool.overlap` each actor runs two units at once,
each in its own thread: one unit's fetch overlaps the other's compute, and computes run one at
a time, so the next shard's bytes arrive while the current one is captioned; a third unit
waits queued on the actor, so the next fetch starts the moment a compute ends. Ray Data reads
an actor's use as units in flight over the calls it runs at once: its scaling thresholds are
set per call, so a pool grows and shrinks at the same units per actor as without overlap.

How Ray Data carries a unit (one row per unit, a batch of one, every value wrapped in a leading
axis of 1) stays in this module: workers and prepare functions see the unit itself.

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
- a dead actor is always restarted and Ray retries what was queued on it;
- a worker's exception is noted with the unit (a bug: the rows say what it was) and the unit is
  dropped, not the job; a worker may also end its own process past a deadline
  (watchdog.deadline);
- `run_units` returns every unit that produced no result with the reason its note gives, for
  the job to record as error rows.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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

WAIT_FOR_ACTORS_S = 600  # Ray Data gives up on placing a pool's first actors after this
UNIT_STAGE = "unit"  # the name a unit's starts are counted under (_failed/shard-N.unit.tries)
FETCH_STAGE = "fetch"  # and its fetches' (a worker with a fetch phase)
# Ray Data's default actor pool thresholds, in units in flight per actor: grow above 1.75,
# shrink below 0.5 (ray.data.context DEFAULT_ACTOR_POOL_UTIL_*_THRESHOLD)
UPSCALE_UNITS, DOWNSCALE_UNITS = 1.75, 0.5


@dataclass(frozen=True)
class Pool:
    """What runs the units: `worker(**kwargs)` per actor of `cpus` CPUs; `actors` pins the
    pool's size, 0 lets it grow to the cluster's CPUs; `notes` is the folder where tries and
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


def pool_size(pool: Pool, units: int | None = None) -> tuple[int, int]:
    """(min, max) actors: `actors` pins it; otherwise it grows to the cluster's CPUs (and to
    no more actors than units), at least one. An actor larger than every node could never be
    placed: refused here rather than waited for."""
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
        return pool.actors, pool.actors
    most = max(1, int(float(ray.cluster_resources().get("CPU", 1)) // pool.cpus))
    return 1, min(most, units) if units else most


def run_units(
    units: list[dict],
    pool: Pool,
    on_result: Callable[[dict], None] = lambda _: None,
    verbose: bool = False,
) -> dict[int, str]:
    """Run every unit through the pool; `on_result` sees each result as it arrives (with the
    `node` that computed it). Returns {unit id: why} for the units that produced none."""
    import ray

    if not units:
        return {}
    low, high = pool_size(pool, len(units))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose  # the job prints its own progress line
    ctx.print_on_execution_start = verbose
    ctx.max_errored_blocks = -1  # a unit that fails is dropped, not the whole job
    ctx.wait_for_min_actors_s = WAIT_FOR_ACTORS_S
    calls = 2 if pool.overlap else 1  # units an actor runs at once (module docstring)
    ctx.autoscaling_config = dataclasses.replace(
        ctx.autoscaling_config,
        actor_pool_util_upscaling_threshold=UPSCALE_UNITS / calls,
        actor_pool_util_downscaling_threshold=DOWNSCALE_UNITS / calls,
    )
    clear_notes(pool.notes, [int(u["unit"]) for u in units])  # a fresh start: no tries used
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    if pool.prepare is not None:  # as tasks of their own, tried as often as the actors' units
        ds = ds.map_batches(
            _prepared,
            fn_kwargs={"fn": pool.prepare, "kwargs": pool.prepare_kwargs, "notes": pool.notes},
            batch_size=1,
            batch_format="numpy",
            num_cpus=pool.prepare_cpus,
            max_retries=pool.tries - 1,
        )
    # named after the worker, so Ray's dashboard and state API show MapBatches(CaptionWorker)
    actor = type(pool.worker.__name__, (_Actor,), {"__module__": _Actor.__module__})
    ds = ds.map_batches(
        actor,
        fn_constructor_kwargs={
            "worker": pool.worker,
            "kwargs": pool.kwargs,
            "notes": pool.notes,
            "tries": pool.tries,
            "overlap": pool.overlap,
        },
        batch_size=1,
        batch_format="numpy",
        num_cpus=pool.cpus,
        # starts as large as the cluster allows; may shrink when idle (the job's tail)
        compute=ray.data.ActorPoolStrategy(
            min_size=low,
            max_size=high,
            initial_size=high,
            max_tasks_in_flight_per_actor=pool.in_flight + calls - 1,
            max_concurrent_calls_per_actor=calls,
            enable_true_multi_threading=pool.overlap,
        ),
        # a dead actor is always restarted (a pool with none would wait forever) and Ray
        # retries the units queued on it; the tries are counted by _Actor (module docstring)
        max_restarts=-1,
        max_task_retries=-1,
    )
    done: set[int] = set()
    for row in ds.iter_rows():
        result = {k: _plain(v) for k, v in row.items()}
        done.add(int(result["unit"]))
        on_result(result)
    missing = [int(u["unit"]) for u in units if int(u["unit"]) not in done]
    return {u: why_failed(pool.notes, u, pool.tries) for u in missing}


def why_failed(notes: str | Path, unit: int, tries: int) -> str:
    """The recorded reason a unit produced no result, from its note."""
    note = read_note(notes, unit) or {}
    if note.get("reason") == TIMEOUT:
        return f"{TIMEOUT}: {note.get('stage')} ran over {note.get('seconds')} s"
    if note.get("reason") == WORKER_ERROR:  # a bug: the job's log has the traceback
        return f"{WORKER_ERROR}: {note.get('detail')}"
    return f"{WORKER_DIED}: its worker died on each of {tries} attempts"


def unit_of(batch: dict) -> dict:
    """The unit a batch of one carries."""
    return {k: v[0] for k, v in batch.items()}


def batch_of(unit: dict) -> dict:
    """A unit as a batch of one: arrays get a leading axis; lists (ragged or of strings)
    become a (1, N) object array, so Ray Data never tries to stack their items."""
    out = {}
    for k, v in unit.items():
        if isinstance(v, np.ndarray):
            out[k] = v[None]
        elif isinstance(v, list | tuple):
            arr = np.empty((1, len(v)), dtype=object)
            for i, x in enumerate(v):
                arr[0, i] = x
            out[k] = arr
        else:
            out[k] = np.array([v])
    return out


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


def _prepared(batch: dict, fn: Callable, kwargs: dict, notes: str) -> dict:
    unit = unit_of(batch)
    try:
        return batch_of(fn(unit, **kwargs))
    except Exception as e:  # a bug, not a bad input: noted, as _Actor notes its worker's
        detail = str(e) if isinstance(e, WorkerFailure) else f"{type(e).__name__}: {e}"
        note_failure(notes, int(unit["unit"]), WORKER_ERROR, detail)
        raise


class _Actor:
    """One actor of the pool: the worker, loaded once; counts each unit's starts of each phase
    and lets one unit compute at a time (module docstring)."""

    def __init__(self, worker: type, kwargs: dict, notes: str, tries: int, overlap: bool):
        import ray

        self.worker = worker(**kwargs)
        self.overlap = overlap
        self.computing = threading.Lock()
        self.proven = False  # a unit has come through this process: fetches may overlap
        self.notes, self.tries = notes, tries
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: dict) -> dict:
        unit = unit_of(batch)
        uid = int(unit["unit"])
        if self.overlap and not self.proven:
            # Ray retries a unit on its restarted (so unproven) actor: one whose computes
            # ended every process they ran in is passed by before its fetch
            if tries_used(self.notes, uid, UNIT_STAGE) >= self.tries:
                raise OutOfTries(f"unit {uid}: {UNIT_STAGE} started {self.tries} times")
        fetched = self.overlap and self.proven
        if fetched:  # beside the other unit's compute
            unit = self._phase(uid, FETCH_STAGE, self.worker.fetch, unit)
        unit["node"] = self.node  # the unit itself, not a copy: the worker may let parts go
        with self.computing:
            if self.overlap and not fetched:  # this process's first unit(s): one at a time
                unit = self._phase(uid, FETCH_STAGE, self.worker.fetch, unit)
            result = self._phase(uid, UNIT_STAGE, self.worker, unit)
            self.proven = True
        return batch_of({**result, "unit": uid, "node": self.node})

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

"""The executor's pool on a real local Ray: workers see the unit itself, results come back
with their node, a unit whose worker raises is reported with its reason, and its tries are
bounded; a worker with a fetch phase overlaps one unit's fetch with another's compute, and a
unit waiting to compute loses no try when its neighbour kills the actor; a worker that cannot
start fails the run with its reason."""

import glob
import os
import sys
import threading
import time

import numpy as np
import pytest

from capfleet.cluster.pool import UNIT_STAGE, Pool, run_units
from capfleet.cluster.watchdog import WORKER_ERROR, tries_path
from capfleet.core.errors import CapfleetError


class Squares:
    """A worker: load once, map one unit."""

    def __init__(self, offset: int):
        self.offset = offset

    def __call__(self, unit: dict) -> dict:
        if int(unit["unit"]) == 3:
            raise ValueError("unit 3 is poison")
        values = np.asarray(unit["values"])
        return {"total": int((values**2).sum()) + self.offset, "words": len(unit["words"])}


def test_units_through_the_pool(local_ray, tmp_path):
    local_ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # a test module
    units = [
        {"unit": u, "values": list(range(u + 1)), "words": ["a"] * u + [["ragged", "x"]]}
        for u in range(6)
    ]
    pool = Pool(worker=Squares, kwargs={"offset": 100}, notes=str(tmp_path), tries=2)
    seen: list = []
    failed = run_units(units, pool, seen.append)
    assert failed.keys() == {3}
    assert failed[3].startswith(f"{WORKER_ERROR}: ValueError: unit 3 is poison")
    by_unit = {r["unit"]: r for r in seen}
    assert sorted(by_unit) == [0, 1, 2, 4, 5]
    for u, r in by_unit.items():
        assert r["total"] == sum(v * v for v in range(u + 1)) + 100 and r["words"] == u + 1
        assert r["node"] == local_ray.get_runtime_context().get_node_id()
    # the poison unit was started, and no more often than its tries allow; the counts of
    # units that finished are gone
    assert 1 <= len(tries_path(tmp_path, 3, UNIT_STAGE).read_bytes()) <= 2
    assert [p.name for p in tmp_path.glob("_failed/*.tries")] == ["shard-000003.unit.tries"]


class Phased:
    """A worker with a fetch phase: each phase sleeps as its unit says and records when it ran;
    a unit with `die` ends its process in the middle of its compute."""

    def fetch(self, unit: dict) -> dict:
        t0 = time.time()
        time.sleep(float(unit["fetch_s"]))
        return {**unit, "fetched": [t0, time.time()]}

    def __call__(self, unit: dict) -> dict:
        t0 = time.time()
        time.sleep(float(unit["compute_s"]))
        if unit["die"]:
            os._exit(1)
        return {"fetched": list(unit["fetched"]), "computed": [t0, time.time()]}


def phased_units(*specs: tuple) -> list[dict]:
    return [
        {"unit": u, "fetch_s": f, "compute_s": c, "die": d} for u, (f, c, d) in enumerate(specs)
    ]


def test_an_actor_fetches_the_next_unit_while_it_computes_one(local_ray, tmp_path):
    local_ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    units = phased_units(*[(0.6, 0.6, False)] * 6)
    seen: list = []
    pool = Pool(worker=Phased, kwargs={}, notes=str(tmp_path), actors=1, overlap=True)
    assert run_units(units, pool, seen.append) == {}
    computes = sorted(tuple(r["computed"]) for r in seen)
    assert len(computes) == 6
    # one compute at a time
    assert all(a[1] <= b[0] + 0.01 for a, b in zip(computes, computes[1:], strict=False))
    # and fetches ran beside them: once the first unit came through, each was fetched
    # (mostly) while the one before it computed
    overlapped = [
        r["unit"]
        for r in seen
        if any(c[0] < r["fetched"][1] - 0.3 and r["fetched"][0] < c[1] for c in computes)
    ]
    assert len(overlapped) >= 3, seen


def test_a_unit_waiting_to_compute_loses_no_try_when_its_neighbour_kills_the_actor(
    local_ray, tmp_path
):
    local_ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # a unit comes through first, so the actor overlaps; then unit 1 fetches at once and dies
    # computing while unit 2, fetched by then, waits its turn
    units = phased_units((0.0, 0.1, False), (0.0, 1.0, True), (0.3, 0.1, False))
    seen: list = []
    pool = Pool(worker=Phased, kwargs={}, notes=str(tmp_path), actors=1, tries=1, overlap=True)
    failed = run_units(units, pool, seen.append)
    assert list(failed) == [1] and failed[1].startswith("worker_died")
    assert sorted(r["unit"] for r in seen) == [0, 2]  # one try each: 2 did not spend its own


def test_units_retried_on_a_restarted_actor_run_one_after_the_other(local_ray, tmp_path):
    """Retried together on the fresh actor, a poison unit that dies quickly and a neighbour
    that fetches slowly: were they overlapped, the neighbour would be fetching at each death
    and spend its tries."""
    local_ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    units = phased_units((0.0, 0.5, True), (1.5, 0.1, False))
    seen: list = []
    pool = Pool(worker=Phased, kwargs={}, notes=str(tmp_path), actors=1, tries=2, overlap=True)
    failed = run_units(units, pool, seen.append)
    assert list(failed) == [0] and failed[0].startswith("worker_died")
    assert [r["unit"] for r in seen] == [1]


def test_a_unit_whose_compute_tries_are_spent_is_passed_by_before_its_fetch(local_ray, tmp_path):
    from capfleet.cluster.pool import _Actor
    from capfleet.cluster.watchdog import OutOfTries, start_try

    fetched = []

    class Counted(Phased):
        def fetch(self, unit: dict) -> dict:
            fetched.append(int(unit["unit"]))
            return super().fetch(unit)

    # retried on its restarted actor (a fresh process), after its computes ended two
    actor = _Actor(Counted, {}, str(tmp_path), tries=2, overlap=True)
    (poison, fine) = phased_units((0.0, 0.0, False), (0.0, 0.0, False))
    for _ in range(2):
        start_try(str(tmp_path), 0, UNIT_STAGE, 2)
    with pytest.raises(OutOfTries):
        actor(poison)
    assert actor(fine)["unit"] == 1
    assert fetched == [1]


class Unloadable:
    def __init__(self):
        raise CapfleetError("bundle.json: not a bundle")


def test_a_worker_that_cannot_start_fails_the_run_with_its_reason(local_ray, tmp_path):
    local_ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    pool = Pool(worker=Unloadable, kwargs={}, notes=str(tmp_path), actors=2)
    with pytest.raises(CapfleetError, match="no worker could start: .*bundle.json: not a bundle"):
        run_units([{"unit": 0}], pool)


class Fragile:
    """A worker that no longer loads in an actor restarted after one of its units crashed it
    (the marker file names that actor): as one whose node lost what it had fetched."""

    def __init__(self, marker: str):
        import ray

        self.me = ray.get_runtime_context().get_actor_id()
        if os.path.exists(marker) and open(marker).read() == self.me:
            raise CapfleetError("the bundle is gone")
        self.marker = marker
        open(f"{marker}.loaded-{self.me}", "w").close()

    def __call__(self, unit: dict) -> dict:
        if unit["die"] and not os.path.exists(self.marker):
            deadline = time.time() + 60  # once both actors have loaded
            while len(glob.glob(f"{self.marker}.loaded-*")) < 2 and time.time() < deadline:
                time.sleep(0.05)
            with open(self.marker, "w") as f:
                f.write(self.me)
            os._exit(1)
        time.sleep(0.1)
        return {"actor": self.me}


def test_an_actor_lost_for_good_after_a_restart_hands_its_units_to_the_others(local_ray, tmp_path):
    local_ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    units = [{"unit": u, "die": u == 3} for u in range(8)]
    seen, said = [], []
    marker = str(tmp_path / "crashed")
    pool = Pool(worker=Fragile, kwargs={"marker": marker}, notes=str(tmp_path), actors=2)
    assert run_units(units, pool, seen.append, said.append) == {}
    assert sorted(r["unit"] for r in seen) == list(range(8))  # each once, the lost ones too
    assert len(said) == 1 and "lost for good" in said[0], said
    crashed = open(marker).read()
    assert crashed not in {r["actor"] for r in seen if r["unit"] == 3}


def test_a_prepare_stage_gets_room_beside_a_pool_of_default_size(local_ray, tmp_path):
    """Actors on every CPU would leave the prepare tasks none, and wait on them forever."""
    local_ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    units = [{"unit": u, "values": [u], "words": []} for u in range(4)]
    pool = Pool(
        worker=Squares,
        kwargs={"offset": 0},
        notes=str(tmp_path),
        prepare=_doubled,
        prepare_cpus=0.5,
    )
    seen: list = []
    run = threading.Thread(target=lambda: run_units(units, pool, seen.append), daemon=True)
    run.start()
    run.join(timeout=120)
    assert not run.is_alive(), "the pool waited on prepare tasks that had no CPU"
    assert sorted(r["total"] for r in seen if r["unit"] != 3) == [0, 4, 16]


def _doubled(unit: dict) -> dict:
    return {**unit, "values": [2 * v for v in unit["values"]]}

"""The executor's pool on a real local Ray: workers see the unit itself, results come back
with their node, a unit whose worker raises is reported with its reason, and its tries are
bounded; the unit <-> batch encoding round-trips ragged lists and arrays."""

import sys

import numpy as np

from capfleet.cluster.pool import UNIT_STAGE, Pool, batch_of, run_units, unit_of
from capfleet.cluster.watchdog import WORKER_ERROR, tries_path


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


def test_a_unit_round_trips_through_a_batch_of_one():
    unit = {
        "unit": 7,
        "ids": ["a", "b"],
        "refs": [["x", "y"], []],
        "image": np.zeros((2, 4, 4, 3), np.uint8),
        "where": '{"path": "p"}',
    }
    batch = batch_of(unit)
    assert batch["image"].shape == (1, 2, 4, 4, 3) and batch["refs"].shape == (1, 2)
    back = unit_of(batch)
    assert back["unit"] == 7 and list(back["ids"]) == ["a", "b"] and back["where"] == unit["where"]
    assert [list(r) for r in back["refs"]] == [["x", "y"], []]
    assert back["image"].shape == (2, 4, 4, 3)

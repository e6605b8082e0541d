"""Every job's frame: OUT made or a clear error, the lock held and released, a killed
writer's leftovers removed, steps timed, job.json written last."""

import json

import pytest

from capfleet.core.artifacts import LOCK_FILE, TMP_PREFIX
from capfleet.core.errors import CapfleetError
from capfleet.jobs.skeleton import JOB_FILE, JobRun


def test_a_run_locks_cleans_times_and_writes_job_json(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / f"{TMP_PREFIX}part.parquet.x").write_bytes(b"half")  # a killed writer's
    lines: list = []
    run = JobRun("compress", out, {"trials": ["int8"]}, lines.append, ("pyarrow",), ("ray",))
    with run:
        assert (out / LOCK_FILE).exists() and not list(out.glob(f"{TMP_PREFIX}*"))
        with run.step("trials"):
            pass
        job = run.finish(trials=1)
    assert not (out / LOCK_FILE).exists()
    assert json.loads((out / JOB_FILE).read_text()) == job
    assert job["kind"] == "compress" and job["spec"] == {"trials": ["int8"]} and job["trials"] == 1
    assert set(job["versions"]) == {"python", "pyarrow"}
    assert job["ray_seconds"] == 0.0 and job["trials_seconds"] >= 0.0
    assert job["wall_seconds"] >= job["trials_seconds"]
    assert any("removed 1 temporary files" in line for line in lines)


def test_an_output_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(CapfleetError, match="file/o: cannot create the output folder"):
        with JobRun("train", tmp_path / "file" / "o", {}):
            pass

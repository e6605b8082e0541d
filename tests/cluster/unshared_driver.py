"""Run by test_unshared.py inside its own mount namespace, where a tmpfs covers PRIVATE: the
driver sees that folder, the cluster's workers (outside the namespace) see only the empty
folder beneath it. Prints JSON: what each job did."""

import json
import shutil
import sys
from pathlib import Path


def main(address: str, bundle: str, images: str, private: str, s3_out: str, data: str) -> None:
    from capfleet.core.errors import CapfleetError
    from capfleet.jobs.caption.caption_config import CaptionConfig
    from capfleet.jobs.caption.job import run_caption_job

    driver_bundle = Path(private) / "bundle"  # only this driver holds it
    shutil.copytree(bundle, driver_bundle)
    common = {"input": images, "split": "train", "limit": 24, "shard_size": 8, "batch_size": 8}
    result = {}
    job = run_caption_job(
        CaptionConfig(bundles=(str(driver_bundle),), out=s3_out, address=address, **common),
        log=lambda _: None,
    )
    result["s3"] = {"rows": job["rows"], "shards": job["shards"]}
    try:
        run_caption_job(
            CaptionConfig(
                bundles=(str(driver_bundle),),
                out=str(Path(private) / "out"),
                address=address,
                **common,
            ),
            log=lambda _: None,
        )
        result["local"] = {"error": None}
    except CapfleetError as e:
        result["local"] = {"error": str(e)}
    result["train"] = train_frozen(address, private, data, s3_out)
    print(json.dumps(result))


def train_frozen(address: str, private: str, data: str, s3_out: str) -> dict:
    """A frozen backbone's variant trained from a data set in the store into the store: the
    driver's temporary folder is private too, so the workers can lean on nothing it holds."""
    import os
    import tempfile

    from capfleet.core.storage import place
    from capfleet.jobs.train.variants import run_train_job
    from capfleet.model.train_config import TrainConfig, TrainGrid

    os.environ["TMPDIR"] = str(Path(private) / "tmp")
    Path(os.environ["TMPDIR"]).mkdir()
    tempfile.tempdir = None  # read again from TMPDIR
    out = place(s3_out).with_name("train")
    cfg = TrainConfig(
        data=data, out=str(out / "base"), encoder="mobilenet_v2", units=16, embed_dim=8, epochs=1
    )
    grid = TrainGrid(out=str(out), variants=(cfg,), names=("base",))
    table = run_train_job(grid, address=address, log=lambda _: None)
    return {"status": table["status"].to_pylist(), "error": table["error"].to_pylist()}


if __name__ == "__main__":
    main(*sys.argv[1:])

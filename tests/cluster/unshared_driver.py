"""Run by test_unshared.py inside its own mount namespace, where a tmpfs covers PRIVATE: the
driver sees that folder, the cluster's workers (outside the namespace) see only the empty
folder beneath it. Prints JSON: what each job did."""

import json
import shutil
import sys
from pathlib import Path


def main(address: str, bundle: str, images: str, private: str, s3_out: str) -> None:
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
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])

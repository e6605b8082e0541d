"""Run by test_multinode.py in its own process (a Ray driver can join one cluster per process):
a head with no CPUs and two 1-CPU worker nodes on this machine (ray.cluster_utils.Cluster), a
caption job with default sizing whose autoscaling pool lands on both workers, one worker
removed mid-job. Prints JSON."""

import json
import sys
import threading
import time
from pathlib import Path

import capfleet


def main(bundle: str, images: str, out: str) -> None:
    from capfleet.cluster.connect import LOOPBACK_ENV, use_loopback

    use_loopback()
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from capfleet.jobs.caption.caption_config import CaptionConfig
    from capfleet.jobs.caption.job import run_caption_job
    from capfleet.jobs.caption.parts import read_captions

    env = {"env_vars": {**capfleet.TF_ENV, **LOOPBACK_ENV}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        ray.init(address=cluster.address, runtime_env=env, log_to_driver=False)
        nodes = {n["NodeManagerAddress"] for n in ray.nodes()}
        cfg = CaptionConfig(
            bundles=(bundle,),
            input=images,
            out=out,
            batch_size=8,
            shard_size=50,
            # default sizing: an autoscaling pool of 1-CPU actors, as large as the cluster
            # allows: it must grow onto both 1-CPU worker nodes by itself
        )
        result = {}
        job = threading.Thread(target=lambda: result.update(run_caption_job(cfg, log=print)))
        job.start()
        actor_nodes: set = set()
        deadline = time.time() + 120
        while len(actor_nodes) < 2 and time.time() < deadline and job.is_alive():
            alive = list_actors(filters=[("state", "=", "ALIVE")], detail=True)
            actor_nodes = {a.node_id for a in alive if "CaptionWorker" in a.class_name}
            time.sleep(0.5)
        parts = Path(out) / "captions"
        while job.is_alive() and len(list(parts.rglob("*.parquet"))) < 2:
            time.sleep(0.2)
        done_before = len(list(parts.rglob("*.parquet")))
        cluster.remove_node(workers[1])  # mid-job: its actor and shards are lost
        job.join(600)
        rows = read_captions(out).to_pylist()
        print(
            "RESULT "
            + json.dumps(
                {
                    "loopback": sorted(nodes),
                    "worker_node_ids": sorted(w.node_id for w in workers),
                    "actor_nodes": sorted(actor_nodes),
                    "parts_before_removal": done_before,
                    "finished": not job.is_alive() and bool(result),
                    "rows": len(rows),
                    "distinct": len({r["image_id"] for r in rows}),
                    "ok": sum(r["status"] == "ok" for r in rows),
                }
            ),
            flush=True,
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])

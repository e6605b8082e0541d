"""Run by test_multinode.py in its own process: a head with no CPUs and two 1-CPU worker nodes
on this machine (ray.cluster_utils.Cluster); a frozen backbone's features computed as a Ray
Data job over both; one worker removed mid-job once both have written parts; the job rerun
(it resumes from the parts); the joined features compared with one process's. Prints JSON."""

import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

import capfleet


def main(data: str, out: str) -> None:
    from capfleet.cluster.connect import LOOPBACK_ENV, use_loopback

    use_loopback()
    import ray
    from ray.cluster_utils import Cluster

    from capfleet.jobs.train.feature_job import compute_features
    from capfleet.model.data import read_split
    from capfleet.model.features import cache_file
    from capfleet.model.train_config import TrainConfig

    cfg = TrainConfig(data=data, out=str(Path(out) / "model"), encoder="mobilenet_v2", seed=5)
    records = read_split(data, "train")
    final = cache_file(cfg.feature_cache, "mobilenet_v2", cfg.weights_id, records)  # all decode
    folder = final.with_suffix(".parts")
    env = {"env_vars": {**capfleet.TF_ENV, **LOOPBACK_ENV}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        ray.init(address=cluster.address, runtime_env=env, log_to_driver=False)
        nodes = {n["NodeManagerAddress"] for n in ray.nodes()}
        result, error = {}, []

        def job():
            try:
                result.update(compute_features(cfg, shard_size=8, log=print))
            except Exception as e:  # noqa: BLE001  a job that lost its node may fail: rerun
                error.append(repr(e))

        thread = threading.Thread(target=job)
        thread.start()
        seen: set = set()
        deadline = time.time() + 240
        while len(seen) < 2 and time.time() < deadline and thread.is_alive():
            seen = {json.loads(p.read_text())["node"] for p in folder.glob("part-*.json")}
            time.sleep(0.2)
        before = len(list(folder.glob("part-*.npy")))
        cluster.remove_node(workers[1])  # mid-job: its actor and shards are lost
        thread.join(600)
        first_ok = not error
        again = compute_features(cfg, shard_size=8, log=print)  # resumes from the parts
        train = np.load(final)
    finally:
        ray.shutdown()
        cluster.shutdown()
    # the same features as one process computes them for the cache (model/features.py)
    import tf_keras as keras

    from capfleet.model.encoders import build_encoder, encoder_info
    from capfleet.model.features import load_split
    from capfleet.model.images import preprocess

    keras.utils.set_random_seed(5)
    backbone = build_encoder("mobilenet_v2", None)
    images, _ = load_split(data, "train", 224, log=lambda _: None)
    alone = backbone.predict(preprocess(images, encoder_info("mobilenet_v2").preprocess), verbose=0)
    print(
        "RESULT "
        + json.dumps(
            {
                "loopback": sorted(nodes),
                "worker_node_ids": sorted(w.node_id for w in workers),
                "part_nodes_before_removal": sorted(seen),
                "parts_before_removal": before,
                "parts": len(list(folder.glob("part-*.npy"))),
                "first_run_error": None if first_ok else error[0][:300],
                "rerun": again,
                "shape": list(train.shape),
                "alone_shape": list(alone.shape),
                "scale": float(np.abs(alone).max()),
                "max_abs_diff": (
                    float(np.abs(train - alone).max()) if train.shape == alone.shape else None
                ),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])

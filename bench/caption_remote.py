"""The caption job on images behind a slow host: the same real-sized photo JPEGs (bench/photos.py,
~45 KB, 500x375) read from local disk, then served by a loopback HTTP server that waits 50 ms
and 200 ms before each answer, and from a loopback S3 API server (moto, its own process) with the
job's output written there too, with default flags (as `capfleet caption` runs), one after the
other on this machine. Loopback S3 is no real store: its ratio says what the object-store path
costs in capfleet and pyarrow, not what a distant bucket adds. Recorded: each run's images/s
(rows over the job's wall time, start-up included) and the summary's throughput, and their
ratios to local disk, and the CPU the loopback server used meanwhile (on the same cores: a real
host's or store's is not the job's).

The bundle is MobileNetV2 int8 with random weights and a Flickr8k-sized decoder (the fastest
captioner, so the one latency hurts most). CAPFLEET_BENCH_REMOTE_ROWS sets the rows (20,000)."""

from __future__ import annotations

import http.server
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

from bench.caption_scale import make_bundle
from bench.common import write_result
from bench.photos import make_jpegs

ROWS = int(os.environ.get("CAPFLEET_BENCH_REMOTE_ROWS", 20_000))
DISTINCT = 2000
LATENCIES_MS = (50, 200)


def _serve(folder: str, latency_s: float, port_queue) -> None:
    """A loopback server of `folder`'s files, each answer `latency_s` late (its own process)."""
    files = {f"/{p.name}": p.read_bytes() for p in Path(folder).glob("*.jpg")}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            time.sleep(latency_s)
            body = files.get(self.path.split("?", 1)[0])
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port_queue.put(server.server_address[1])
    server.serve_forever()


def _serve_s3(port_queue) -> None:
    """moto's S3 API server on loopback, in its own process (its CPU is the server's, as a real
    store's would be)."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port_queue.put(server.get_host_and_port()[1])
    while True:
        time.sleep(3600)


def _s3_photos(port: int, photos: list[Path]) -> list[str]:
    """The photos uploaded to a new bucket; their URIs, with the endpoint in each."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True
    )
    fs.create_dir("bench")
    for p in photos:
        with fs.open_output_stream(f"bench/photos/{p.name}") as f:
            f.write(p.read_bytes())
    return [f"s3://bench/photos/{p.name}?{_options(port)}" for p in photos]


def _options(port: int) -> str:
    return f"endpoint_override=127.0.0.1:{port}&scheme=http"


def _manifest(path: Path, uris: list[str]) -> Path:
    """ROWS distinct ids over the photos, cycled; a URL gets a query of its own per row, so
    that no layer can answer a row from a cache of another's."""
    web = uris[0].startswith("http")
    with open(path, "w") as f:
        f.write("image_id,uri\n")
        for i in range(ROWS):
            f.write(f"img{i:07d},{uris[i % len(uris)]}{f'?r={i}' if web else ''}\n")
    return path


def _cpu_s(pid: int | None) -> float:
    """CPU seconds a process has used (user + system), from /proc."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _caption(bundle: Path, manifest: Path, out, server: int | None = None) -> dict:
    """The job, and the CPU the loopback server (process `server`) used meanwhile: on a real
    host or store that CPU is not the job's machine's, here it shares the same cores."""
    from capfleet.core.storage import place, read_parquet
    from capfleet.jobs.caption.caption_config import CaptionConfig
    from capfleet.jobs.caption.job import run_caption_job

    cfg = CaptionConfig(bundles=(str(bundle),), input=str(manifest), out=str(out), gallery=0)
    t0, cpu0 = time.perf_counter(), _cpu_s(server)
    job = run_caption_job(cfg, log=lambda _: None)
    wall = time.perf_counter() - t0
    server_cpu = _cpu_s(server) - cpu0
    summary = read_parquet(place(str(out)) / "summary.parquet").to_pylist()[0]
    assert summary["ok"] == ROWS, summary
    return {
        "rows": ROWS,
        "wall_s": round(wall, 1),
        "images_per_s": round(ROWS / wall, 1),
        "summary_throughput_img_s": round(summary["throughput_img_s"], 1),
        "read_ms_mean": round(summary["read_ms"], 2),
        "ray_start_s": job["ray_start_seconds"],
        "server_cpu_s": round(server_cpu, 1),
        "server_share_of_cores": round(server_cpu / ((os.cpu_count() or 1) * wall), 3),
    }


def run() -> None:
    with tempfile.TemporaryDirectory(prefix="capfleet-bench-remote-") as tmp:
        tmp = Path(tmp)
        photos = make_jpegs(tmp / "photos", DISTINCT)
        bundle = make_bundle(
            tmp / "mobilenet-int8", "mobilenet_v2", "int8", [p.read_bytes() for p in photos[:32]]
        )
        runs = {
            "local": _caption(
                bundle, _manifest(tmp / "local.csv", [str(p) for p in photos]), tmp / "out-local"
            )
        }
        ctx = multiprocessing.get_context("spawn")
        for ms in LATENCIES_MS:
            ports = ctx.Queue()
            server = ctx.Process(target=_serve, args=(str(tmp / "photos"), ms / 1000, ports))
            server.start()
            try:
                base = f"http://127.0.0.1:{ports.get(timeout=60)}"
                uris = [f"{base}/{p.name}" for p in photos]
                runs[f"http_{ms}ms"] = _caption(
                    bundle, _manifest(tmp / f"http{ms}.csv", uris), tmp / f"out-{ms}", server.pid
                )
            finally:
                server.terminate()
                server.join()
        ports = ctx.Queue()
        server = ctx.Process(target=_serve_s3, args=(ports,))
        server.start()
        try:
            port = ports.get(timeout=120)
            os.environ.update(  # test keys for the loopback server; no metadata lookups
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench",
                AWS_EC2_METADATA_DISABLED="true",
                AWS_DEFAULT_REGION="us-east-1",
            )
            uris = _s3_photos(port, photos)
            out = f"s3://bench/out?{_options(port)}"
            runs["s3"] = _caption(bundle, _manifest(tmp / "s3.csv", uris), out, server.pid)
        finally:
            server.terminate()
            server.join()
        local = runs["local"]["images_per_s"]
        for r in runs.values():
            r["ratio_to_local"] = round(r["images_per_s"] / local, 3)
    targets = {"http_50ms": 0.90, "http_200ms": 0.80}
    write_result(
        "caption_remote",
        {
            "rows": ROWS,
            "distinct_photos": DISTINCT,
            "bundle": "mobilenet_v2 int8, random weights, Flickr8k-sized decoder",
            "s3": "moto server on loopback, input and output in it (a ratio, not a store's speed)",
            "flags": "defaults (one 1-CPU actor per core, shard 1024, 128 reads in flight)",
            "runs": runs,
            "targets": targets,
            "met": {k: runs[k]["ratio_to_local"] >= v for k, v in targets.items()},
        },
    )

"""Faults a caption job meets at scale, on a real local Ray: a shard that kills every worker
it lands on, a shard that hangs, rows to repair, parts a crash left behind, a second writer."""

import http.server
import os
import signal
import stat
import threading

import pyarrow.parquet as pq
import pytest

from capfleet.core.artifacts import LOCK_FILE, TMP_PREFIX, OutputLock
from capfleet.core.errors import CapfleetError
from capfleet.jobs.caption.caption_config import CaptionConfig
from capfleet.jobs.caption.job import run_caption_job
from capfleet.jobs.caption.parts import part_path, read_captions
from capfleet.model.data import Flickr8kReader


def pid_of_client(port: int) -> int | None:
    """The local process whose TCP socket has source port `port` (Linux /proc)."""
    inode = None
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port:
            inode = fields[9]
            break
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return int(pid)
        except OSError:
            continue
    return None


class Faulty(http.server.ThreadingHTTPServer):
    """127.0.0.1 only. /poison.jpg kills the worker that asks for it (as an out-of-memory kill
    would) while `poison` is set; /hang.jpg never answers; /img.jpg is a JPEG."""

    def __init__(self, jpeg: bytes):
        self.hits: dict = {}
        self.kills = 0
        self.poison = True
        self.stop = threading.Event()  # ends a /hang.jpg answer, so closing the server is quick
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                if self.path == "/poison.jpg" and server.poison:
                    for _ in range(50):  # the socket table can lag a busy machine
                        pid = pid_of_client(self.client_address[1])
                        if pid:
                            break
                        threading.Event().wait(0.1)
                    if pid and pid != os.getpid():
                        os.kill(pid, signal.SIGKILL)
                        server.kills += 1
                    return
                if self.path == "/hang.jpg":
                    server.stop.wait(60)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(jpeg)))
                self.end_headers()
                self.wfile.write(jpeg)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture()
def faulty(shapes_dir):
    rec = Flickr8kReader(shapes_dir, "test").records()[0]
    s = Faulty(open(rec.uri, "rb").read())
    yield s
    s.stop.set()
    s.shutdown()
    s.server_close()


def manifest(tmp_path, urls):
    (tmp_path / "m.csv").write_text(
        "image_id,uri\n" + "".join(f"r{i},{u}\n" for i, u in enumerate(urls))
    )
    return tmp_path / "m.csv"


def test_a_shard_that_kills_its_workers_is_bounded_and_retried_by_a_rerun(
    local_ray, tiny_bundle, faulty, tmp_path
):
    urls = [f"{faulty.url}/img.jpg"] * 12
    urls[5] = f"{faulty.url}/poison.jpg"  # shard 1 of 3
    cfg = CaptionConfig(
        bundles=(str(tiny_bundle),),
        input=str(manifest(tmp_path, urls)),
        out=str(tmp_path / "o"),
        shard_size=4,
        batch_size=4,
        max_retries=1,
    )
    job = run_caption_job(cfg, log=lambda _: None)
    assert job["shards"]["failed"] == 1
    assert faulty.kills == 2  # one try and one retry: no endless loop
    rows = {r["image_id"]: r for r in read_captions(cfg.out).to_pylist()}
    assert len(rows) == 12
    for i in range(12):
        r = rows[f"r{i}"]
        if 4 <= i < 8:
            assert r["status"] == "error" and r["error"].startswith("worker_died"), r
        else:
            assert r["status"] == "ok", r
    faulty.poison = False  # the cause is gone (more memory, a fixed decoder): rerun
    again = run_caption_job(cfg, log=lambda _: None)
    assert (again["shards"]["run"], again["shards"]["failed"]) == (1, 0)
    rows = read_captions(cfg.out).to_pylist()
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows)
    assert not list((tmp_path / "o" / "_failed").glob("*.tries"))  # counts of written parts


@pytest.mark.slow
def test_a_shard_that_hangs_times_out(local_ray, tiny_bundle, faulty, tmp_path):
    urls = (
        [f"{faulty.url}/img.jpg"] * 4 + [f"{faulty.url}/hang.jpg"] + [f"{faulty.url}/img.jpg"] * 3
    )
    cfg = CaptionConfig(
        bundles=(str(tiny_bundle),),
        input=str(manifest(tmp_path, urls)),
        out=str(tmp_path / "o"),
        shard_size=4,
        max_retries=0,
        shard_timeout_s=4.0,
    )
    job = run_caption_job(cfg, log=lambda _: None)
    assert job["shards"]["failed"] == 1
    rows = {r["image_id"]: r for r in read_captions(cfg.out).to_pylist()}
    assert all(rows[f"r{i}"]["status"] == "ok" for i in range(4))
    for i in range(4, 8):
        assert rows[f"r{i}"]["error"].startswith("timeout: fetch ran over 4.0 s")
    # the gallery shows the captioned images and does not ask the hanging host again
    page = (tmp_path / "o" / "gallery.html").read_text()
    assert page.count('<img src="data:image/jpeg') == 4
    assert faulty.hits["/hang.jpg"] == 1


@pytest.mark.slow
def test_retry_errors_repairs_only_the_failed_rows(local_ray, tiny_bundle, shapes_dir, tmp_path):
    recs = Flickr8kReader(shapes_dir, "train").records()[:10]
    later = tmp_path / "later.jpg"  # listed, but written only after the first run
    lines = [f"{r.image_id},{r.uri}" for r in recs] + [f"late,{later}"]
    (tmp_path / "m.csv").write_text("image_id,path\n" + "\n".join(lines) + "\n")
    cfg = CaptionConfig(
        bundles=(str(tiny_bundle),),
        input=str(tmp_path / "m.csv"),
        out=str(tmp_path / "o"),
        shard_size=4,
    )
    run_caption_job(cfg, log=lambda _: None)
    before = {r["image_id"]: r for r in read_captions(cfg.out).to_pylist()}
    assert before["late"]["error"].startswith("missing")
    later.write_bytes(open(recs[0].uri, "rb").read())
    plain = run_caption_job(cfg, log=lambda _: None)  # a plain rerun trusts finished parts
    assert plain["shards"]["run"] == 0
    job = run_caption_job(cfg, log=lambda _: None, retry_errors=True)
    assert job["shards"]["run"] == 1  # only the shard holding the error row
    after = {r["image_id"]: r for r in read_captions(cfg.out).to_pylist()}
    assert len(after) == 11 and after["late"]["status"] == "ok"
    for k in before:
        if k != "late":
            assert after[k] == before[k]  # ok rows untouched, to the worker and latency
    summary = pq.read_table(tmp_path / "o" / "summary.parquet").to_pylist()[0]
    assert (summary["ok"], summary["failed"]) == (11, 0)


def test_resume_redoes_broken_parts_clears_leftovers_and_files_are_readable(
    local_ray, tiny_bundle, shapes_dir, tmp_path
):
    out = tmp_path / "o"
    cfg = CaptionConfig(
        bundles=(str(tiny_bundle),),
        input=str(shapes_dir),
        split="train",
        out=str(out),
        shard_size=16,
    )
    run_caption_job(cfg, log=lambda _: None)
    first = {r["image_id"]: r["caption"] for r in read_captions(out).to_pylist()}
    empty, cut = part_path(out, "tiny-fp32", 0), part_path(out, "tiny-fp32", 1)
    empty.write_bytes(b"")  # a crash before any byte landed
    cut.write_bytes(cut.read_bytes()[:-100])  # a truncated footer
    leftover = empty.parent / f"{TMP_PREFIX}part-000002.parquet.abc"
    leftover.write_bytes(b"half a file")
    job = run_caption_job(cfg, log=lambda _: None)
    assert job["shards"]["run"] == 2 and not leftover.exists()
    assert {r["image_id"]: r["caption"] for r in read_captions(out).to_pylist()} == first
    mask = os.umask(0)
    os.umask(mask)
    for f in [*out.rglob("*.parquet"), out / "job.json", out / "plan.json"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f  # not mkstemp's 0600


def test_one_writer_per_output_and_a_dead_writers_lock_is_taken_over(
    local_ray, tiny_bundle, shapes_dir, tmp_path
):
    out = tmp_path / "o"
    cfg = CaptionConfig(bundles=(str(tiny_bundle),), input=str(shapes_dir), out=str(out))
    with OutputLock(out, "caption job"):
        with pytest.raises(CapfleetError, match=r"another caption job is writing here \("):
            run_caption_job(cfg, log=lambda _: None)
    dead = os.fork()
    if dead == 0:  # a job that takes the lock and is killed holding it
        OutputLock(out, "caption job").__enter__()
        os._exit(0)
    os.waitpid(dead, 0)  # a pid that is gone
    assert (out / LOCK_FILE).exists()
    lines: list = []
    job = run_caption_job(cfg, log=lines.append)
    assert job["rows"] == {"tiny-fp32": 8} and not (out / LOCK_FILE).exists()
    assert any("taking over the lock" in line for line in lines)


def test_a_changed_beam_width_or_bundle_is_refused_naming_it(
    local_ray, tiny_bundle, second_bundle, shapes_dir, tmp_path
):
    import shutil

    out = tmp_path / "o"
    cfg = CaptionConfig(bundles=(str(tiny_bundle),), input=str(shapes_dir), out=str(out))
    run_caption_job(cfg, log=lambda _: None)
    with pytest.raises(CapfleetError, match="different beam_width"):
        run_caption_job(CaptionConfig(**{**cfg.__dict__, "beam_width": 3}), log=lambda _: None)
    changed = tmp_path / "tiny-fp32"
    shutil.copytree(second_bundle, changed)  # the same name, other files
    import json

    m = json.loads((changed / "manifest.json").read_text())
    m["name"] = "tiny-fp32"
    m["encoder"]["preprocess"] = "tf"  # another encoder section: other captions
    (changed / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CapfleetError, match="bundle 'tiny-fp32' differs"):
        run_caption_job(CaptionConfig(bundles=(str(changed),), input=str(shapes_dir), out=str(out)))
    both = CaptionConfig(
        bundles=(str(tiny_bundle), str(second_bundle)), input=str(shapes_dir), out=str(out)
    )
    assert run_caption_job(both, log=lambda _: None)["rows"] == {"tiny-fp32": 8, "tiny-b": 8}


def test_changed_references_are_a_plan_mismatch(local_ray, tiny_bundle, shapes_dir, tmp_path):
    import shutil

    from capfleet.jobs.caption.parts import PlanMismatch

    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    cfg = CaptionConfig(bundles=(str(tiny_bundle),), input=str(data), out=str(tmp_path / "o"))
    run_caption_job(cfg, log=lambda _: None)
    tokens = data / "Flickr8k.token.txt"  # the rows hold the references they were scored on
    tokens.write_text(tokens.read_text().replace("small", "tiny"))
    with pytest.raises(PlanMismatch, match="different inputs_sha256"):
        run_caption_job(cfg, log=lambda _: None)


def test_retry_errors_counts_only_the_rows_it_captioned(
    local_ray, tiny_bundle, shapes_dir, tmp_path
):
    recs = Flickr8kReader(shapes_dir, "train").records()[:8]
    later = tmp_path / "later.jpg"
    lines = [f"{r.image_id},{r.uri}" for r in recs] + [f"late,{later}"]
    (tmp_path / "m.csv").write_text("image_id,path\n" + "\n".join(lines) + "\n")
    cfg = CaptionConfig(
        bundles=(str(tiny_bundle),), input=str(tmp_path / "m.csv"), out=str(tmp_path / "o")
    )
    run_caption_job(cfg, log=lambda _: None)
    later.write_bytes(open(recs[0].uri, "rb").read())
    run_caption_job(cfg, log=lambda _: None, retry_errors=True)
    from capfleet.jobs.caption.parts import part_stats as stats_of_part
    from capfleet.jobs.caption.parts import parts

    repaired = [stats_of_part(p) for p in parts(cfg.out, "tiny-fp32")]
    assert [(s.rows, s.ok, s.captioned) for s in repaired] == [(9, 9, 1)]
    summary = pq.read_table(tmp_path / "o" / "summary.parquet").to_pylist()[0]
    span = repaired[0].finished - repaired[0].started
    assert summary["throughput_img_s"] == pytest.approx(1 / span)  # not 9 rows in the repair

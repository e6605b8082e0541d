"""Hostile inputs, on real loopback servers and files: a server that drips bytes, redirects
anywhere, names that resolve to link-local or metadata addresses (through the resolver hook:
no packet ever leaves loopback), Retry-After, formats that would run other programs, huge
Parquet cells and row groups, FIFOs, and secrets beside the code a submit would stage."""

import http.server
import io
import os
import socket
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from capfleet.jobs.caption import fetch, web
from capfleet.jobs.caption.fetch import image_bytes, read_parquet_slice, read_uri
from capfleet.jobs.gallery import thumbnail
from capfleet.model.images import decode_image

ROOT = Path(__file__).resolve().parents[3]
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n"


def jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


class Hostile(http.server.ThreadingHTTPServer):
    """127.0.0.1 only: /img.jpg; /drip.jpg sends a byte every 0.3 s; /loop redirects to
    itself; /to-file redirects to file:///etc/passwd; /to-metadata redirects to a name the
    resolver hook maps to 169.254.169.254; /busy answers 429 with Retry-After once."""

    def __init__(self, retry_after: str = "1"):
        self.hits: dict = {}
        self.stop = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                if self.path == "/drip.jpg":
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    while not server.stop.wait(0.3):
                        try:
                            self.wfile.write(b"x")
                            self.wfile.flush()
                        except OSError:
                            return
                    return
                target = {
                    "/loop": "/loop",
                    "/to-file": "file:///etc/passwd",
                    "/to-metadata": "http://metadata.test/latest/meta-data/",
                }.get(self.path)
                if target:
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.end_headers()
                    return
                if self.path == "/busy" and server.hits[self.path] == 1:
                    self.send_response(429)
                    self.send_header("Retry-After", retry_after)
                    self.end_headers()
                    return
                body = jpeg()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.stop.set()
        self.shutdown()
        self.server_close()


@pytest.fixture()
def hostile():
    s = Hostile()
    yield s
    s.close()


@pytest.fixture()
def only_loopback(monkeypatch):
    """Names resolve through the hook: metadata.test -> 169.254.169.254, v6.test -> the AWS
    IPv6 metadata address, mapped.test -> it as IPv4-mapped IPv6; any connect to an address
    off loopback fails the test before a packet is sent."""
    real = socket.getaddrinfo
    fake = {
        "metadata.test": (socket.AF_INET, ("169.254.169.254", 80)),
        "v6.test": (socket.AF_INET6, ("fd00:ec2::254", 80, 0, 0)),
        "mapped.test": (socket.AF_INET6, ("::ffff:169.254.169.254", 80, 0, 0)),
    }

    def resolve(host, port, *args, **kwargs):
        if host in fake:
            family, addr = fake[host]
            return [(family, socket.SOCK_STREAM, 6, "", addr)]
        return real(host, port, *args, **kwargs)

    connect = socket.socket.connect

    def guarded(sock, address):
        assert address[0] in ("127.0.0.1", "::1"), f"a connection to {address} was attempted"
        return connect(sock, address)

    monkeypatch.setattr(web, "RESOLVE", resolve)
    monkeypatch.setattr(socket.socket, "connect", guarded)


def test_a_dripping_server_meets_one_deadline_for_the_whole_request(hostile, monkeypatch):
    t0 = time.monotonic()
    got = web.read_http(f"{hostile.url}/drip.jpg", 10**6, timeout=1.5, attempts=1)
    assert got.reason == "timeout" and time.monotonic() - t0 < 4
    # a shard with it goes on: the other image decodes, the dripping one is one timeout row
    from capfleet.jobs.caption.load import load_shard

    shard = {
        "shard": 0,
        "source": "files",
        "where": "{}",
        "image_id": ["drip", "img"],
        "uri": [f"{hostile.url}/drip.jpg", f"{hostile.url}/img.jpg"],
        "error": ["", ""],
        "references": [[], []],
    }
    monkeypatch.setattr(web, "HTTP_TIMEOUT_S", 1.5)
    out = load_shard(shard, [16])
    assert out["error"][0].startswith("timeout") and out["error"][1] == ""
    assert out["image_16"][1].std() > 0


def test_where_urls_may_point(hostile, only_loopback, tmp_path):
    cases = {
        f"{hostile.url}/to-file": "refused_scheme",
        f"{hostile.url}/loop": "too_many_redirects",
        f"{hostile.url}/to-metadata": "refused_address",
        "http://metadata.test/latest/meta-data/": "refused_address",
        "http://v6.test/": "refused_address",
        "http://mapped.test/": "refused_address",
    }
    for url, reason in cases.items():
        got = read_uri(url, attempts=1)
        assert getattr(got, "reason", None) == reason, (url, got)
    assert hostile.hits["/loop"] == web.MAX_REDIRECTS + 1
    # loopback and private addresses: allowed by default, refused for an untrusted list
    assert isinstance(read_uri(f"{hostile.url}/img.jpg"), bytes)
    refused = read_uri(f"{hostile.url}/img.jpg", policy=web.UrlPolicy(allow_private=False))
    assert refused.reason == "refused_address" and "private" in refused.detail
    # the gallery's thumbnails fetch through the same rules
    from capfleet.jobs.caption.report import _thumbnail_bytes

    rows = [{"image_id": "m", "uri": "http://metadata.test/x.jpg", "status": "ok"}]
    assert _thumbnail_bytes(tmp_path, rows, web.DEFAULT_POLICY) == {"m": None}


def test_retry_after_is_honoured_and_a_long_one_is_not_waited_for(hostile):
    t0 = time.monotonic()
    assert isinstance(web.read_http(f"{hostile.url}/busy", 10**6, attempts=2), bytes)
    assert time.monotonic() - t0 >= 1.0 and hostile.hits["/busy"] == 2
    slow = Hostile(retry_after="3600")
    try:
        t0 = time.monotonic()
        got = web.read_http(f"{slow.url}/busy", 10**6, attempts=3)
        assert got.reason == "http_429" and slow.hits["/busy"] == 1
        assert time.monotonic() - t0 < 5
    finally:
        slow.close()


def test_formats_that_would_run_another_program_are_refused():
    for data in (EPS, b"%!PS-Adobe-3.0\n%%Pages: 1\nshowpage\n"):
        got = decode_image(data, (16, 16))  # whatever the file is named
        assert got.reason == "unsupported_format" and "EPS" in got.detail
        assert thumbnail(data) == (None, "not shown: unsupported_format")
    assert decode_image(b"not an image at all", (16, 16)).reason == "not_an_image"
    assert decode_image(jpeg(), (16, 16)).shape == (16, 16, 3)


def test_parquet_cells_are_capped_and_a_shard_reads_only_its_rows(tmp_path, monkeypatch):
    assert image_bytes(b"x" * 101, max_bytes=100).reason == "too_large"
    assert image_bytes({"bytes": b"x" * 100, "path": "a"}, max_bytes=100) == b"x" * 100
    n = 1000
    table = pa.table({"id": [str(i) for i in range(n)], "image": [b"%d" % i for i in range(n)]})
    path = tmp_path / "one-row-group.parquet"
    pq.write_table(table, path)  # pyarrow's defaults: one row group for all of them
    assert pq.ParquetFile(path).num_row_groups == 1

    def whole(*args, **kwargs):
        raise AssertionError("a shard read the whole row group")

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", whole)
    monkeypatch.setattr(pq.ParquetFile, "read", whole)
    got = read_parquet_slice(str(path), 0, 300, 400, ["id", "image"])
    assert got["id"] == [str(i) for i in range(300, 700)]
    assert got["image"] == [b"%d" % i for i in range(300, 700)]


def test_a_fifo_is_an_error_row_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    result: list = []
    reader = threading.Thread(target=lambda: result.append(read_uri(str(fifo))), daemon=True)
    reader.start()
    reader.join(5)
    assert result and result[0].reason == "not_a_file"


def test_a_tars_references_are_capped(tmp_path):
    import tarfile

    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.jpg", jpeg()), ("a.txt", b"y" * (fetch.MAX_CAPTION_BYTES + 1))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    [(key, members)] = list(fetch.stream_tar(str(path), 10**6))
    image, captions = fetch.sample_parts(members)
    assert key == "a" and isinstance(image, bytes) and captions == []
    assert members["txt"].reason == "too_large"


def test_submit_stages_no_secret_and_every_list_agrees(tmp_path, monkeypatch):
    from capfleet.cluster import submit

    root = tmp_path / "pkg"
    for name in submit.PACKAGE_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("# code\n")
    secrets = [".env", "prod.env", "deploy.pem", "tls.key", "id_rsa", "aws_credentials", ".git"]
    for sub in submit.SUBPACKAGES:
        (root / sub).mkdir()
        (root / sub / "code.py").write_text("# code\n")
        for s in secrets:
            (root / sub / s).write_text("SECRET=1\n")
    monkeypatch.setattr(submit, "PACKAGE_ROOT", root)
    spec = tmp_path / "spec.toml"
    spec.write_text('kind = "caption"\n')
    staged = submit.stage(spec, tmp_path / "staged")
    names = {p.name for p in staged.rglob("*")}
    assert "code.py" in names and not names & set(secrets)
    rsync = set(
        yaml.safe_load((ROOT / "cluster" / "deploy" / "aws.yaml").read_text())["rsync_exclude"]
    )
    docker = set((ROOT / ".dockerignore").read_text().split())
    for pattern in submit.NEVER_STAGED:
        assert pattern in rsync or f"**/{pattern}" in rsync, pattern
        assert f"**/{pattern}" in docker, pattern
    import tomllib

    shipped = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    top = {p.split(".")[1] for p in shipped["packages"] if p.count(".") == 1} - {"jobs.examples"}
    assert set(submit.SUBPACKAGES) == top


def test_the_gallery_shows_what_the_job_fetched_without_fetching_it_again(
    local_ray, tiny_bundle, hostile, tmp_path
):
    from capfleet.jobs.caption.caption_config import CaptionConfig
    from capfleet.jobs.caption.job import run_caption_job

    urls = [f"{hostile.url}/img.jpg?n={n}" for n in range(4)]
    manifest = tmp_path / "urls.csv"
    manifest.write_text("image_id,uri\n" + "".join(f"i{n},{u}\n" for n, u in enumerate(urls)))
    out = tmp_path / "o"
    cfg = CaptionConfig(bundles=(str(tiny_bundle),), input=str(manifest), out=str(out), gallery=4)
    job = run_caption_job(cfg, log=lambda _: None)
    assert job["rows"] == {"tiny-fp32": 4}
    assert {hostile.hits[u.removeprefix(hostile.url)] for u in urls} == {1}  # once, by the job
    assert (out / "gallery.html").read_text().count("data:image/jpeg;base64,") == 4


def test_a_host_rate_spaces_the_requests_of_many_threads(hostile):
    from concurrent.futures import ThreadPoolExecutor

    policy = web.UrlPolicy(host_rate=20.0)
    urls = [f"{hostile.url}/img.jpg?rate={n}" for n in range(10)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(10) as pool:
        got = list(pool.map(lambda u: read_uri(u, policy=policy), urls))
    assert all(isinstance(g, bytes) for g in got)
    assert time.monotonic() - t0 >= 9 / 20.0  # ten starts, 1/20 s apart


def test_malformed_urls_and_redirects_are_rows_and_a_silent_tls_peer_meets_the_deadline(
    hostile, tmp_path
):
    for url in ("http://[x/a.jpg", "http://127.0.0.1:99999/a.jpg", "http://127.0.0.1:ab/a.jpg"):
        got = read_uri(url, attempts=1)  # an error row, never an exception for the shard
        assert got.reason in ("unreachable", "refused_scheme"), (url, got)
    assert read_uri(str(tmp_path)).reason == "not_a_file"  # a folder named in a manifest
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # accepts connections (the kernel does) and never answers a handshake
    try:
        t0 = time.monotonic()
        port = silent.getsockname()[1]
        got = web.read_http(f"https://127.0.0.1:{port}/a.jpg", 10**6, timeout=1.0, attempts=1)
        assert got.reason == "timeout" and time.monotonic() - t0 < 3
    finally:
        silent.close()


def test_ipv4_inside_ipv6_is_judged_as_the_ipv4_it_carries():
    problem = web.address_problem
    assert problem("64:ff9b::93.184.216.34", allow_private=False) is None  # NAT64, public
    assert "link-local" in problem("64:ff9b::169.254.169.254", allow_private=True)
    assert "link-local" in problem("2002:a9fe:a9fe::", allow_private=True)  # 6to4
    assert "private" in problem("2002:0a00:0001::", allow_private=False)  # 6to4 of 10.0.0.1
    assert problem("::ffff:10.0.0.1", allow_private=True) is None


class KeepAlive(http.server.ThreadingHTTPServer):
    """127.0.0.1 only, HTTP/1.1: /img.jpg on connections it keeps open; counts them. With
    `close_idle`, it closes each connection after its first answer without saying so (as a
    server whose idle timeout passed)."""

    def __init__(self, close_idle: bool = False):
        self.connections = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                server.connections += 1

            def do_GET(self):
                body = jpeg()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                if close_idle:
                    self.close_connection = True

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_connections_are_kept_alive_per_host_and_a_closed_one_is_replaced():
    for close_idle, most in ((False, 1), (True, 12)):
        server = KeepAlive(close_idle)
        url = f"http://127.0.0.1:{server.server_address[1]}/img.jpg"
        try:
            got = [web.read_http(url, timeout=5, attempts=1) for _ in range(12)]
            assert all(isinstance(g, bytes) and decode_image(g, (8, 8)).shape for g in got)
            assert server.connections == most  # one connection for all, or a fresh one each
        finally:
            server.shutdown()
            server.server_close()

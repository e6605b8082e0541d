"""The `capfleet` command line: parses arguments and calls a job; no logic of its own."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from capfleet.core.errors import CapfleetError
from capfleet.jobs.caption.caption_config import CAPTION_DEFAULTS, PLAN_CPUS, CaptionConfig
from capfleet.model.train_config import TrainConfig


def _data_shapes(args: argparse.Namespace) -> int:
    from capfleet.model import shapes

    start = time.perf_counter()
    counts = shapes.generate(args.out, images=args.images, seed=args.seed)
    took = time.perf_counter() - start
    split_text = ", ".join(f"{k} {v}" for k, v in counts.items())
    print(f"wrote {sum(counts.values())} images ({split_text}) to {args.out} in {took:.1f} s")
    return 0


def _data_rehearsal(args: argparse.Namespace) -> int:
    from capfleet.model import rehearsal

    start = time.perf_counter()
    counts = rehearsal.generate(args.out, images=args.images, seed=args.seed)
    took = time.perf_counter() - start
    print(
        f"wrote {counts['images']} photos (train {counts['train']}, dev {counts['dev']}, test "
        f"{counts['test']}, {counts['in_no_split']} in no split), {counts['vocabulary']} words, "
        f"to {args.out} in {took:.0f} s. Its captions are unrelated to its images: it measures "
        "scale, not quality."
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from capfleet.compression.export import export_bundle
    from capfleet.core.artifacts import OutputLock
    from capfleet.core.storage import mirror, staging

    with OutputLock(args.out, "export"), staging(args.out) as folder:  # one writer per bundle
        m = export_bundle(str(mirror(args.model)), folder)
    print(f"bundle written to {args.out}: {m['size_mb']:.2f} MB ({m['gzip_size_mb']:.2f} MB gzip)")
    return 0


def _caption(args: argparse.Namespace) -> int:
    from capfleet.jobs import api

    cfg = CaptionConfig(
        bundles=tuple(args.bundle),
        input=args.input,
        out=args.out,
        split=args.split,
        references=args.references or "",
        address=args.address or "",
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        actors=args.actors,
        actor_cpus=args.actor_cpus,
        decode_cpus=args.decode_cpus,
        beam_width=args.beam_width,
        image_column=args.image_column,
        caption_column=args.caption_column,
        max_image_mb=args.max_image_mb,
        allow_private_urls=not args.refuse_private_urls,
        max_host_rate=args.max_host_rate,
        max_retries=args.max_retries,
        shard_timeout_s=args.shard_timeout,
        gallery=args.gallery,
        limit=args.limit,
    )
    done = api.caption(cfg, verbose=args.verbose, retry_errors=args.retry_errors)
    print(
        f"captions in {args.out}/captions/, summary in {args.out}/summary.parquet "
        f"({done.job['wall_seconds']} s)"
    )
    if done.job["reports"]:
        print("open in a browser or viewer: " + ", ".join(done.job["reports"]))
    if not sum(done.summary.column("ok").to_pylist()):  # every row an error: nothing to use
        print("caption: no image could be captioned (see the error column and summary.parquet)")
        return 1
    return 1 if done.job["shards"]["failed"] else 0


def _plan(args: argparse.Namespace) -> int:
    from capfleet.jobs import api

    try:
        cpus = [float(c) for c in args.cpus.split(",") if c.strip()]
    except ValueError:
        raise CapfleetError(f"--cpus: comma-separated numbers, got {args.cpus!r}") from None
    done = api.plan(
        args.spec,
        images=args.images,
        cpus=cpus,
        price_per_cpu_hour=args.price_per_cpu_hour,
        sample=args.sample,
    )
    print(done.text)
    if args.json:
        Path(args.json).write_text(done.json, encoding="utf-8")
    return 0


def _report(args: argparse.Namespace) -> int:
    from capfleet.jobs.compress.trial_report import write_report

    path = write_report(args.dir)
    print(path.read_text(encoding="utf-8"))
    return 0


def run_spec(cfg, address: str | None) -> int:
    """Run a loaded spec of any kind; the same outputs embedded, attached or submitted."""
    from capfleet.jobs import api

    done = api.run(cfg, address=address)
    if isinstance(done, api.TrainResult):
        if isinstance(cfg, TrainConfig) and not address:
            seconds = done.variants.column("train_seconds")[0].as_py()
            print(f"model written to {cfg.out} ({seconds} s)")
        return 1 if done.ok == 0 else 0
    if isinstance(done, api.CompressResult):
        print(f"trials in {cfg.out}/trials.parquet, report in {done.report}")
        if done.gallery:
            print(f"gallery: open {done.gallery} in a browser")
        if done.met is not None:  # a goal search
            if done.met:
                print(f"chosen: {done.winner}, bundle in {done.best}; why: {done.choice}")
            else:
                print(f"no candidate meets the goal; the closest are in {done.choice}")
            return 0 if done.met else 1
        return 0 if done.ok else 1
    if isinstance(done, api.CaptionResult):
        print(f"captions in {cfg.out}/captions/, summary in {cfg.out}/summary.parquet")
        return 1 if done.job["shards"]["failed"] else 0
    return 0


def _run(args: argparse.Namespace) -> int:
    """capfleet run, train and compress: the last two take only specs of their own kind."""
    from capfleet.jobs.specs import load_spec

    return run_spec(load_spec(args.spec, args.kind), args.address or None)


def _submit(args: argparse.Namespace) -> int:
    from capfleet.cluster import submit
    from capfleet.jobs.specs import load_spec, read_spec, relative_paths

    load_spec(args.spec)  # a bad spec is refused here, not on the cluster
    relative = relative_paths(read_spec(args.spec))
    if relative:
        raise CapfleetError(
            f"{args.spec}: {relative[0]} is a relative path, which means nothing on the "
            "cluster; give absolute paths the cluster's nodes see, or object-store URIs"
        )
    job_id = submit.submit(args.spec, args.address, args.install_deps)
    print(f"submitted {args.spec} as {job_id} to {args.address}")
    if not args.follow:
        print(f"follow it: capfleet jobs logs {job_id} --address {args.address} --follow")
        return 0
    final = submit.follow(args.address, job_id, lambda s: print(s, end="", flush=True))
    print(f"job {job_id}: {final}")
    return 0 if final == "SUCCEEDED" else 1


def _jobs(args: argparse.Namespace) -> int:
    from capfleet.cluster import submit

    if args.action == "list":
        for j in submit.list_jobs(args.address):
            print(f"{j['id']}  {j['status']:<10} {j['spec'] or j['entrypoint']}")
        return 0
    if not args.job_id:
        raise CapfleetError(f"`capfleet jobs {args.action}` needs a job id")
    if args.action == "status":  # exit 1 for a job that failed or was stopped
        state = submit.status(args.address, args.job_id)
        print(state)
        return 1 if str(state) in ("FAILED", "STOPPED") else 0
    elif args.action == "logs" and args.follow:
        final = submit.follow(args.address, args.job_id, lambda s: print(s, end="", flush=True))
        print(f"job {args.job_id}: {final}")
        return 0 if str(final) == "SUCCEEDED" else 1
    elif args.action == "logs":
        print(submit.logs(args.address, args.job_id), end="")
    else:
        stopped = submit.stop(args.address, args.job_id)
        print(f"job {args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


DEMO_SPEC = Path(__file__).resolve().parent / "examples" / "demo.toml"


def _demo(args: argparse.Namespace) -> int:
    from capfleet.jobs import api
    from capfleet.jobs.specs import build_pipeline, read_spec

    doc = read_spec(DEMO_SPEC)
    table = {**doc["pipeline"], "out": args.out}
    cfg = build_pipeline(table, f"{DEMO_SPEC} [pipeline]")
    print(f"capfleet demo: the whole product on the embedded shapes data set, into {args.out}")
    api.pipeline(cfg, address=args.address or None)
    return 0


def _add_caption(sub) -> None:
    """capfleet caption: the caption job's flags, their defaults from CAPTION_DEFAULTS."""
    cap = sub.add_parser("caption", help="caption an image set with one or more bundles on Ray")
    cap.add_argument(
        "--bundle",
        action="append",
        required=True,
        help="a bundle directory (repeat for several models)",
    )
    cap.add_argument(
        "--input",
        required=True,
        help="a folder, a .parquet/.csv manifest (paths, object-store or http(s) URIs), a "
        "Flickr8k directory, a COCO JSON, WebDataset .tar shards (a file, folder, glob or "
        "{000..009} pattern), or Parquet with image bytes",
    )
    cap.add_argument("--out", required=True, help="output directory (rerun it to resume)")
    cap.add_argument(
        "--split",
        default="",
        help="split of a Flickr8k input (default test) or a Karpathy JSON (default all)",
    )
    cap.add_argument("--references", help="a captioned data set to score BLEU against")
    cap.add_argument("--address", help="a running Ray cluster: auto or ray://HOST:10001")
    d = CAPTION_DEFAULTS
    cap.add_argument(
        "--batch-size", type=int, default=d["batch_size"], help="images per model call"
    )
    cap.add_argument(
        "--shard-size",
        type=int,
        default=d["shard_size"],
        help="images per output part file, at most (a small input is cut finer)",
    )
    cap.add_argument(
        "--actors",
        type=int,
        default=d["actors"],
        help="actors, each hosting every bundle (default: an autoscaling pool as large as the "
        "cluster allows)",
    )
    cap.add_argument("--actor-cpus", type=float, default=d["actor_cpus"], help="CPUs per actor")
    cap.add_argument(
        "--decode-cpus",
        type=float,
        default=d["decode_cpus"],
        help="CPUs per decode task (equal to --actor-cpus: the actors decode their own shards)",
    )
    cap.add_argument("--beam-width", type=int, default=d["beam_width"], help="1 = greedy")
    cap.add_argument(
        "--image-column",
        default=d["image_column"],
        help="the column of image bytes (Parquet input) or of paths/URLs (a manifest; default: "
        "path, uri or url in any case)",
    )
    cap.add_argument(
        "--caption-column",
        default=d["caption_column"],
        help="a manifest's column of reference captions (default: caption, text or captions)",
    )
    cap.add_argument(
        "--max-image-mb",
        type=float,
        default=d["max_image_mb"],
        help="read at most this much per image; larger is an error row (default 64)",
    )
    cap.add_argument(
        "--refuse-private-urls",
        action="store_true",
        help="refuse URLs that resolve to loopback or private addresses (an untrusted list); "
        "link-local and cloud-metadata addresses are always refused",
    )
    cap.add_argument(
        "--max-host-rate",
        type=float,
        default=d["max_host_rate"],
        help="at most this many requests a second to one host from one worker (0: no bound)",
    )
    cap.add_argument(
        "--max-retries",
        type=int,
        default=d["max_retries"],
        help="tries after the first for a shard whose worker dies (default 2)",
    )
    cap.add_argument(
        "--shard-timeout",
        type=float,
        default=d["shard_timeout_s"],
        help="seconds a stage of a shard may take before its worker is ended (default 3600)",
    )
    cap.add_argument(
        "--gallery",
        type=int,
        default=d["gallery"],
        help="images sampled into OUT/gallery.html, every model's caption side by side "
        "(default 200; 0 = none)",
    )
    cap.add_argument(
        "--limit",
        type=int,
        default=d["limit"],
        help="caption only the first N listed images (a trial run; default 0 = all)",
    )
    cap.add_argument(
        "--retry-errors",
        action="store_true",
        help="caption the rows whose status is error again, replacing them in their parts",
    )
    cap.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own messages (always in OUT/capfleet.log)",
    )
    cap.set_defaults(func=_caption)


def _add_plan(sub) -> None:
    """capfleet plan SPEC --images N."""
    pl = sub.add_parser(
        "plan", help="estimate a caption job's time and cost per cluster size (calibrated here)"
    )
    pl.add_argument("spec", help='a caption spec (kind = "caption")')
    pl.add_argument("--images", type=int, required=True, help="images the real job will caption")
    pl.add_argument(
        "--cpus",
        default=",".join(str(c) for c in PLAN_CPUS),
        help="cluster sizes in CPUs, comma-separated (default 8,32,128; this machine's added)",
    )
    pl.add_argument("--price-per-cpu-hour", type=float, help="for a cost column")
    pl.add_argument(
        "--sample",
        type=int,
        default=4096,
        help="calibrate on the first this many images and on a quarter of them (default 4096)",
    )
    pl.add_argument("--json", help="also write the plan as JSON to this file")
    pl.set_defaults(func=_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="capfleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate data sets").add_subparsers(
        dest="what", required=True
    )
    sh = data.add_parser("shapes", help="write the embedded shapes data set (Flickr8k layout)")
    sh.add_argument("--out", required=True, help="output directory")
    sh.add_argument("--images", type=int, default=3000, help="number of images (default 3000)")
    sh.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sh.set_defaults(func=_data_shapes)
    rh = data.add_parser(
        "rehearsal",
        help="write a Flickr8k-sized rehearsal set (8,091 photos, ~8,000 words; captions "
        "unrelated to the images: for scale, not quality)",
    )
    rh.add_argument("--out", required=True, help="output directory")
    rh.add_argument("--images", type=int, default=8091, help="number of photos (default 8091)")
    rh.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    rh.set_defaults(func=_data_rehearsal)

    def spec_command(name: str, help: str, kind: str | None) -> None:
        p = sub.add_parser(name, help=help)
        p.add_argument("spec", help="a TOML spec file")
        p.add_argument("--address", help="a running Ray cluster: auto or ray://HOST:10001")
        p.set_defaults(func=_run, kind=kind)

    spec_command("train", 'train a captioner, or a [grid] of them on Ray (kind = "train")', "train")

    ex = sub.add_parser("export", help="export a trained model directory to an fp32 bundle")
    ex.add_argument("model", help="a model directory written by `capfleet train`")
    ex.add_argument("--out", required=True, help="the bundle directory to write")
    ex.set_defaults(func=_export)

    _add_caption(sub)

    spec_command("compress", 'run compression trials on Ray (kind = "compress")', "compress")

    _add_plan(sub)

    rep = sub.add_parser("report", help="re-render report.md/png of a compress output")
    rep.add_argument("dir", help="a compress output directory (holding trials.parquet)")
    rep.set_defaults(func=_report)

    spec_command("run", "run a spec of any kind (train, compress, caption, pipeline)", None)

    sb = sub.add_parser("submit", help="submit a spec to a Ray cluster (Ray Jobs API)")
    sb.add_argument("spec", help="a TOML spec file; its paths are the cluster's paths")
    sb.add_argument("--address", required=True, help="the Jobs API, e.g. http://HEAD:8265")
    sb.add_argument("--follow", action="store_true", help="stream the logs until it ends")
    sb.add_argument(
        "--install-deps",
        action="store_true",
        help="have Ray pip-install capfleet's dependencies (when the cluster image lacks them)",
    )
    sb.set_defaults(func=_submit)

    jb = sub.add_parser("jobs", help="list submitted jobs, or a job's status, logs; stop one")
    jb.add_argument("action", choices=("list", "status", "logs", "stop"))
    jb.add_argument("job_id", nargs="?", help="the id `capfleet submit` printed")
    jb.add_argument("--address", required=True, help="the Jobs API, e.g. http://HEAD:8265")
    jb.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    jb.set_defaults(func=_jobs)

    demo = sub.add_parser("demo", help="run the whole product on the embedded data set")
    demo.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    demo.add_argument("--address", help="a running Ray cluster instead of the embedded one")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CapfleetError as e:
        print(f"capfleet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("capfleet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

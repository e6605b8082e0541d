"""Compression trials as Ray tasks: every (model, trial) of a compress job at once, each task
with the CPUs it declares, TensorFlow limited to them, a fresh worker process per trial. Then
each bundle's latency is measured alone, one task at a time, so that no trial's timing is
disturbed by another's work.

A trial that raises is recorded as a failed row at once (the error is deterministic); a task
whose worker dies is retried `max_retries` times by Ray, then recorded as failed. Each finished
trial's record is written to OUT/records/ as it arrives, so a rerun does only what is missing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from capfleet.cluster.connect import failure_text, ray_session
from capfleet.cluster.tasks import TaskFailed, run_task, run_tasks
from capfleet.compression.records import (
    failed_record,
    sensitivity_rows,
    write_sensitivity,
    write_trials,
)
from capfleet.compression.settings import TrialSettings, slug, tuning_epochs
from capfleet.compression.trial import measure_bundle, run_trial
from capfleet.core.artifacts import write_json_atomic, write_parquet_atomic
from capfleet.core.storage import is_uri, local, mirror, place, read_parquet, staging
from capfleet.jobs.compress.compress_config import CompressConfig, checked_plan
from capfleet.jobs.compress.trial_gallery import write_compress_gallery
from capfleet.jobs.compress.trial_report import write_report
from capfleet.jobs.gallery import GALLERY_FILE
from capfleet.jobs.skeleton import JobRun
from capfleet.model.data import data_identity
from capfleet.model.modeldir import manifest_sha256, model_data, read_model_manifest


def _trial_task(
    model_dir: str, trial: str, bundle_dir: str, settings: dict, captions: str, data: str
) -> dict:
    """Runs in a Ray worker. Never raises for a trial's own failure: it becomes a record.
    A model or data set in an object store is read from this node's copy of it (mirror); the
    bundle and captions are written to local scratch and published to the store (staging)."""
    try:
        model_copy, data_copy = mirror(model_dir), mirror(data)
        with staging(bundle_dir) as bundle, staging(captions) as kept:
            record = run_trial(
                str(model_copy),
                trial,
                bundle,
                TrialSettings(**settings),
                print,
                kept,
                str(data_copy),
            )
            if is_uri(model_dir) or is_uri(data):  # name what everyone sees, not this node's copies
                _as_given(bundle, kept, {str(model_copy): model_dir, str(data_copy): data})
        return {**record, "bundle": bundle_dir, "data": data}
    except Exception as e:  # noqa: BLE001  one failed trial must not sink the job
        return failed_record(place(model_dir).name, trial, failure_text(e))


def _as_given(bundle: Path, captions: Path, copies: dict[str, str]) -> None:
    """Before publishing: the bundle's source model and the captions' image URIs named as the
    job was given them (store URIs), not as this node's mirror copies of them."""
    import pyarrow as pa

    def given(path: str) -> str:
        for copy, where in copies.items():
            if path == copy or path.startswith(copy + "/"):
                rel = path[len(copy) :].strip("/")
                return str(place(where) / rel) if rel else where
        return path

    manifest_file = Path(bundle) / "manifest.json"
    manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
    source = manifest.get("source_model", {})
    if "path" in source:
        source["path"] = given(source["path"])
        write_json_atomic(manifest_file, manifest)
    if Path(captions).is_file():
        table = read_parquet(captions)
        uris = pa.array([given(u) for u in table["uri"].to_pylist()], pa.string())
        table = table.set_column(table.schema.get_field_index("uri"), "uri", uris)
        write_parquet_atomic(captions, table)


def _measure_task(record: dict, settings: dict) -> dict:
    bundle, data = mirror(record["bundle"]), mirror(record["data"])
    return {**record, **measure_bundle(bundle, str(data), TrialSettings(**settings))}


def _built_for(model_dir: str, data: str, settings: TrialSettings) -> dict:
    """What a finished trial's record depends on: the trained model (its manifest, rewritten by
    every training), the data set it is tuned, calibrated and scored on, and the settings (less
    the thread count)."""
    return {
        "model_manifest_sha256": manifest_sha256(model_dir),
        "data_identity": data_identity(data),
        "settings": {k: v for k, v in asdict(settings).items() if k != "threads"},
    }


def _read_record(path, log) -> dict | None:
    """A finished trial's record, or None (not run yet, or unreadable: it is run again)."""
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(done, dict) and isinstance(done.get("record"), dict):
            return done
    except (OSError, ValueError):
        pass
    log(f"compress: {path} is unreadable (a crash mid-write?); that trial is run again")
    return None


def _record_path(out: Path, model_dir: str, trial: str) -> Path:
    return out / "records" / place(model_dir).name / f"{slug(trial)}.json"


def _captions_path(out: Path, model_dir: str, trial: str) -> Path:
    """A trial's scored test captions (compression.gallery), kept beside its record."""
    return out / "records" / place(model_dir).name / f"{slug(trial)}.captions.parquet"


def _progress(done: int, total: int, r: dict) -> str:
    head = f"[{done}/{total}] {r['model']} {r['trial']}"
    if r["status"] != "ok":
        return f"{head}: FAILED {r['error'].splitlines()[0]}"
    return (
        f"{head}: BLEU-4 {r['bleu4']:.3f}, {r['size_mb']:.2f} MB ({r['gzip_mb']:.2f} gzip), "
        f"built in {r['wall_s']:.0f} s"
    )


def run_compress_job(
    cfg: CompressConfig,
    address: str | None = None,
    log: Callable[[str], None] = print,
    nested: bool = False,
) -> dict:
    """Run every trial of `cfg` on Ray; writes trials.parquet, report.md/png, gallery.html and
    job.json. Returns counts and paths. `nested`: run by a goal search that holds cfg.out."""
    run = JobRun("compress", cfg.out, asdict(cfg), log, nested=nested)
    plan = checked_plan(cfg)  # refuses a bad model or recipe before anything starts
    with run:
        with run.ray(address):
            result = _run_trials(cfg, plan, address, log)
        log(
            f"compress: {result['ok']} ok, {result['failed']} failed in {run.wall:.0f} s; "
            f"{result['report']}"
        )
        run.finish(**result)
    return result


def _run_trials(cfg: CompressConfig, plan, address: str | None, log: Callable[[str], None]):
    out = local(cfg.out)
    threads = max(1, int(cfg.cpus_per_trial))
    settings = asdict(replace(cfg.settings, threads=threads))
    records: dict[tuple[str, str], dict] = {}
    todo, stale = [], 0
    data = {m: model_data(m, read_model_manifest(m), cfg.data) for m in cfg.models}
    built_for = {m: _built_for(m, data[m], cfg.settings) for m in cfg.models}
    for model_dir, trial in plan:
        path = _record_path(out, model_dir, trial)
        done = _read_record(path, log)
        # by an earlier run, with every score this version records (dev scores are newer)
        if done and done.get("built_for") == built_for[model_dir] and _complete(done["record"]):
            records[(model_dir, trial)] = done["record"]
        else:
            stale += done is not None
            todo.append((model_dir, trial))
    if records:
        log(f"compress: {len(records)} of {len(plan)} trials already done in {out}")
    if stale:
        log(
            f"compress: {stale} earlier trials redone: "
            "their model or settings changed, or their data"
        )
    if todo:
        with ray_session(address):
            built = {}
            # longest first (Ray starts queued tasks of one kind roughly in submission order),
            # so that no long trial starts last and runs on alone
            todo.sort(key=lambda mt: -tuning_epochs(mt[1], cfg.settings))
            calls = [
                (
                    (model_dir, trial),
                    (
                        str(local(model_dir)),
                        trial,
                        str(out / "bundles" / place(model_dir).name / slug(trial)),
                        settings,
                        str(_captions_path(out, model_dir, trial)),
                        data[model_dir],
                    ),
                    cfg.cpus_per_trial,
                )
                for model_dir, trial in todo
            ]
            log(
                f"compress: {len(todo)} trials on Ray, {cfg.cpus_per_trial:g} CPU each; "
                "then each bundle is timed alone"
            )
            for (model_dir, trial), rec, crash in run_tasks(_trial_task, calls, cfg.max_retries):
                if crash is not None:  # the worker died, retries spent
                    rec = failed_record(
                        place(model_dir).name,
                        trial,
                        f"{crash.kind} after {cfg.max_retries + 1} attempts: {crash.detail}",
                    )
                if rec["status"] == "ok":  # timed alone, below, with nothing else running
                    built[(model_dir, trial)] = rec
                else:
                    records[(model_dir, trial)] = rec
                log(_progress(len(built) + len(records), len(plan), rec))
            for n, (key, rec) in enumerate(built.items(), 1):
                try:
                    rec = run_task(_measure_task, rec, settings, cpus=cfg.cpus_per_trial)
                    done = {"built_for": built_for[key[0]], "record": rec}
                    write_json_atomic(_record_path(out, *key), done)  # failures: tried next run
                except TaskFailed as e:
                    rec = failed_record(rec["model"], rec["trial"], f"timing failed: {e}")
                records[key] = rec
                timed = f"{rec['e2e_ms']:.2f} ms/image" if rec["status"] == "ok" else rec["error"]
                log(f"timed [{n}/{len(built)}] {rec['model']} {rec['trial']}: {timed}")
    ordered = [records[k] for k in plan]
    write_trials(out, ordered)
    write_sensitivity(out, _sensitivity(ordered))
    gallery = _gallery(cfg, out, plan, ordered, log)
    report = write_report(out)
    failed = sum(r["status"] != "ok" for r in ordered)
    return {
        "trials": len(ordered),
        "ok": len(ordered) - failed,
        "failed": failed,
        "report": str(report),
        "gallery": str(gallery) if gallery else None,
    }


def _complete(record: dict) -> bool:
    """A record this version would write: a failed one, or one with its dev scores."""
    return record.get("status") != "ok" or "dev_bleu4" in record


def _sensitivity(records: list[dict]) -> list[dict]:
    """Every built trial's layer sensitivity, from its bundle's manifest."""
    rows = []
    for rec in records:
        if rec.get("status") != "ok" or not rec.get("bundle"):
            continue  # a failed trial has no bundle
        manifest = place(rec["bundle"]) / "manifest.json"
        if manifest.is_file():
            rows += sensitivity_rows(rec, json.loads(manifest.read_text()))
    return rows


def _gallery(cfg: CompressConfig, out: Path, plan, records, log) -> Path | None:
    """OUT/gallery.html: a sample of the test images with every trial's caption (cfg.gallery
    images; 0 removes an earlier run's page, which would describe other trials)."""
    if not cfg.gallery:
        (out / GALLERY_FILE).unlink(missing_ok=True)
        return None
    many = len({place(m).name for m, _ in plan}) > 1
    trials = [
        (f"{r['model']} {r['trial']}" if many else r["trial"], r, _captions_path(out, m, t))
        for (m, t), r in zip(plan, records, strict=True)
    ]
    path = write_compress_gallery(out, trials, cfg.gallery)
    if path is None:
        log("compress: no trial kept its captions, no gallery written")
    return path

"""The goal-driven compression search on Ray: each wave that compression/goal.py chooses runs
as a compress job into the same output (finished trials are kept, so a wave only runs its new
trials, and an interrupted search resumes); then OUT/best/, OUT/choice.md and choice.json.
OUT may be a local folder or a store URI."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from capfleet.cluster.connect import ray_session
from capfleet.compression.goal import (
    Search,
    choice_document,
    choice_json,
    misses,
    render_choice,
)
from capfleet.compression.records import read_trials
from capfleet.compression.settings import slug
from capfleet.core.artifacts import TMP_PREFIX, cpu_info, write_bytes_atomic, write_json_atomic
from capfleet.core.errors import CapfleetError
from capfleet.core.storage import StorePath, copy_in_store, mirror, place, publish
from capfleet.jobs.compress.compress_config import CompressConfig
from capfleet.jobs.compress.trials import run_compress_job
from capfleet.jobs.skeleton import JobRun
from capfleet.model.encoders import encoder_info
from capfleet.model.modeldir import model_data, read_model_manifest

BEST_DIR = "best"
CHOICE_FILE = "choice.md"
COSTS_FILE = "costs.json"  # minimize = "cost": each measured candidate's caption job
COST_SAMPLE = 2048  # images of the model's training split each candidate's job captions
COST_SHARDS_PER_CPU = 4  # ...in shards enough for every CPU to caption several


def run_goal_search(
    cfg: CompressConfig, address: str | None = None, log: Callable[[str], None] = print
) -> dict:
    """Search for the bundle that meets cfg.goal; returns the compress job's counts and paths
    with `met`, `winner`, `best` and `choice` added."""
    if cfg.goal is None:
        raise CapfleetError("a goal search needs [compress.goal]")
    run = JobRun("compress", cfg.out, asdict(cfg), log)
    goal, model = cfg.goal, cfg.models[0]
    manifest = read_model_manifest(model)
    frozen = not encoder_info(manifest["config"]["encoder"]).trainable
    out = place(cfg.out)
    search = Search(goal, frozen, {}, {})
    # trials an earlier run (a search, or a list) recorded here are candidates too; the compress
    # job keeps them if their model, data and settings are unchanged, redoes them if not
    earlier = _recorded(out, place(model).name)
    search.records = {r["trial"]: r for r in earlier}
    search.waves.update({r["trial"]: "an earlier run" for r in earlier})
    tried = list(search.records)
    log(f"search: {goal.describe()}")
    with run:  # the waves' compress jobs run inside this frame (the lock is held once)
        with run.ray(address):
            result = _search(cfg, search, tried, address, log)
        log(f"search: {len(search.records)} trials in {run.wall:.0f} s; {result['choice']}")
        run.finish(**result)
    return result


def _search(cfg: CompressConfig, search: Search, tried: list, address, log) -> dict:
    model, out = cfg.models[0], place(cfg.out)
    job = {}
    with ray_session(address):  # one Ray for every wave
        while True:
            what, trials = search.next_wave()
            if not trials:
                log(f"search: done ({what}) after {len(search.records)} trials")
                break
            log(f"search: wave {what}: {', '.join(trials)}")
            for t in trials:
                search.waves.setdefault(t, what)
            tried += trials
            wave = replace(cfg, trials=tuple(tried), goal=None, gallery=0)
            job = run_compress_job(wave, address, log=log, nested=True)
            search.records = {r["trial"]: r for r in read_trials(out)}
            _measure_costs(cfg, search, address, log)  # the next wave compares costs
        # the last pass has nothing left to run: it writes the gallery of every candidate
        last = replace(cfg, trials=tuple(tried), goal=None)
        job = run_compress_job(last, address, log=log, nested=True)
    search.records = {r["trial"]: r for r in read_trials(out)}
    costs = _measure_costs(cfg, search, address, log)
    search.waves.setdefault("fp32:fp32", "post-training quantization")
    doc = choice_document(search, place(model).name)
    if doc["winner"] in costs:
        doc["fleet"] = costs[doc["winner"]]["fleet"]
    cpu = cpu_info()
    text = render_choice(doc, f"{cpu['cpu']}, {cpu['cores']} cores, int8: {cpu['int8_kind']}")
    write_bytes_atomic(out / CHOICE_FILE, text.encode())
    write_bytes_atomic(out / "choice.json", choice_json(doc).encode())
    best = None
    if doc["met"]:
        best = _publish(out, out / "bundles" / place(model).name / slug(doc["winner"]))
        log(f"search: winner {doc['winner']}, copied to {best}")
    else:
        _remove(out / BEST_DIR)  # an earlier goal's choice: not this goal's
        log(f"search: no candidate meets the goal; closest: {', '.join(doc['closest'])}")
    return {
        **job,
        "met": doc["met"],
        "winner": doc["winner"],
        "best": str(best) if best else None,
        "choice": str(out / CHOICE_FILE),
    }


def _measure_costs(cfg: CompressConfig, search: Search, address, log) -> dict:
    """minimize = "cost": every candidate meeting the goal's bounds measured by a real caption
    job of its bundle (`cost_job`), its cost per million images and job images/s added to its
    record. Kept in OUT/costs.json by the bundle's manifest, so a rerun measures only what
    changed. Returns {trial: measurement}."""
    goal, out = cfg.goal, place(cfg.out)
    if goal.minimize != "cost":
        return {}
    path = out / COSTS_FILE
    known = json.loads(path.read_text()) if path.is_file() else {}
    model = cfg.models[0]
    data = model_data(model, read_model_manifest(model), cfg.data)
    for name, rec in search.records.items():
        if rec.get("status") != "ok" or misses(goal, rec, search.baseline):
            continue
        bundle = place(rec["bundle"])
        identity = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
        measured = known.get(name)
        if not measured or measured["bundle"] != identity:
            log(f"search: {name} meets the bounds; measuring its cost by a real caption job")
            scratch = out / ".costs" / slug(name)
            measured = {"bundle": identity, **cost_job(bundle, data, scratch, goal, address)}
            known[name] = measured
            write_json_atomic(path, known)
        rec.update(job_img_s=measured["job_img_s"], cost_per_million=measured["cost_per_million"])
    return known


def cost_job(
    bundle: Path | StorePath, data: str, scratch: Path | StorePath, goal, address: str | None
) -> dict:
    """One bundle's cost as a caption job runs it: a real job on the cluster (the embedded Ray
    without `address`) over COST_SAMPLE images of the training split of `data`, in shards
    small enough that every CPU gets several (one 1,024-image shard would keep one actor busy
    while the others idle, and charge all their CPUs for one's rate); its own throughput,
    start-up excluded. Returns job_img_s, cpus, cost_per_million at the goal's price, and the
    planner's fleet table for the goal's `images`."""
    from capfleet.cluster.connect import cluster_cpus
    from capfleet.jobs.caption.caption_config import PLAN_CPUS, CaptionConfig
    from capfleet.jobs.caption.planner import measure_job, plan_table, render_plan

    cpus = cluster_cpus(address)
    spec = CaptionConfig(
        bundles=(str(bundle),),
        input=data,
        split="train",
        out=str(scratch),
        address=address or "",
        shard_size=max(1, COST_SAMPLE // (COST_SHARDS_PER_CPU * int(max(1, cpus)))),
    )
    cal = measure_job(spec, COST_SAMPLE, cpus)
    price = goal.price_per_cpu_hour
    return {
        "job_img_s": round(cal.rate, 2),
        "cpus": cal.cpus,
        # CPU-hours a million images take at the measured rate, start-up left out
        "cost_per_million": 1e6 * cal.cpus / cal.rate / 3600 * price,
        "fleet": render_plan(
            cal, goal.images, plan_table(cal, goal.images, PLAN_CPUS, price), price
        ).splitlines(),
    }


def _recorded(out: Path | StorePath, model: str) -> list[dict]:
    """The records of `model` in an earlier run's OUT/trials.parquet."""
    try:
        return [r for r in read_trials(out) if r["model"] == model]
    except CapfleetError:  # none yet
        return []


def _publish(out: Path | StorePath, bundle: Path | StorePath) -> Path | StorePath:
    """Copy the winning bundle to OUT/best/, replacing an earlier choice only once the copy is
    whole (copied beside it, then renamed). Leftovers of a run killed in here (a staging copy,
    the earlier choice set aside) are removed first. A store has no rename: there the earlier
    choice goes first (its manifest before its other files) and the new one is copied in,
    by the store itself when the bundle is in the same one, with its manifest last, so a
    reader finds a whole bundle or none."""
    target = out / BEST_DIR
    if not (bundle / "manifest.json").is_file():  # before the earlier choice is touched
        raise CapfleetError(f"{bundle}: the chosen bundle is not whole (no manifest.json)")
    if isinstance(target, StorePath):
        _remove(target)
        if isinstance(bundle, StorePath) and bundle.fs is target.fs:
            copy_in_store(bundle, target)  # by the store: no download, no upload
        else:
            publish(mirror(bundle), target)
        return target
    staging = out / f"{TMP_PREFIX}{BEST_DIR}"
    old = out / f"{TMP_PREFIX}{BEST_DIR}-old"
    for leftover in (staging, old):
        if leftover.exists():
            shutil.rmtree(leftover)
    shutil.copytree(bundle, staging)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    if old.exists():
        shutil.rmtree(old)
    return target


def _remove(folder: Path | StorePath) -> None:
    """A bundle folder gone (a store's: its manifest first, so it never reads as whole)."""
    if isinstance(folder, StorePath):
        (folder / "manifest.json").unlink(missing_ok=True)
        for rel in list(folder.files()):
            (folder / rel).unlink(missing_ok=True)
    elif folder.exists():
        shutil.rmtree(folder)

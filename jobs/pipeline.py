"""A pipeline job: data -> train variants -> compression trials -> caption, in one Ray session.

Each step writes the layout of the command it stands for, under OUT:
    OUT/data/       the shapes data set (Flickr8k layout), unless [pipeline.data] path is given
    OUT/train/      one model directory per variant + variants.parquet   (capfleet train)
    OUT/compress/   bundles, trials.parquet, report.md/png               (capfleet compress)
    OUT/caption/    captions/, summary.parquet, job.json                 (capfleet caption)
A rerun into the same OUT keeps what is done: the data set, trained variants whose spec is
unchanged, finished trials, captioned shards.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from capfleet.compression.recipes import parse_trial
from capfleet.core.artifacts import write_json_atomic
from capfleet.core.errors import SEED_RANGE, CapfleetError, check_numbers, check_range
from capfleet.core.storage import is_uri, local, place, read_parquet, staging
from capfleet.jobs.caption.caption_config import CAPTION_DEFAULTS, CAPTION_LIMITS
from capfleet.jobs.compress.compress_config import CompressConfig
from capfleet.jobs.skeleton import JobRun
from capfleet.model.modeldir import read_model_manifest
from capfleet.model.train_config import TrainGrid


@dataclass(frozen=True)
class DataStep:
    path: str = ""  # an existing Flickr8k-layout data set; "" = generate the shapes data set
    images: int = 3000  # shapes images to generate
    seed: int = 0

    def __post_init__(self) -> None:
        check_numbers(self)
        check_range(self, {"seed": SEED_RANGE, "images": (0, 10_000_000)})
        if not self.path and self.images < 3:
            raise CapfleetError(f"images: must be >= 3, got {self.images}")


@dataclass(frozen=True)
class CaptionStep:
    trials: tuple[str, ...] = ("fp32", "int8")  # bundles of the best variant to caption with
    split: str = "test"  # which split of the data set to caption (its captions are references)
    batch_size: int = CAPTION_DEFAULTS["batch_size"]
    shard_size: int = CAPTION_DEFAULTS["shard_size"]
    actors: int = CAPTION_DEFAULTS["actors"]
    actor_cpus: float = CAPTION_DEFAULTS["actor_cpus"]

    def __post_init__(self) -> None:
        check_numbers(self)
        check_range(self, {k: v for k, v in CAPTION_LIMITS.items() if hasattr(self, k)})
        if not 0 < self.actor_cpus <= 64:
            raise CapfleetError(f"actor_cpus: must be in (0, 64], got {self.actor_cpus}")
        if not self.trials:
            raise CapfleetError("trials: give at least one trial to caption with")
        for t in self.trials:
            parse_trial(t)
        if self.split not in ("train", "dev", "test"):
            raise CapfleetError(f"split: must be train, dev or test, got {self.split!r}")


@dataclass(frozen=True)
class PipelineConfig:
    out: str
    data: DataStep
    train: TrainGrid
    compress: CompressConfig
    caption: CaptionStep
    compress_variants: str = "best"  # "best": the variant with the best dev cross-entropy; or "all"

    def __post_init__(self) -> None:
        if self.compress_variants not in ("best", "all"):
            raise CapfleetError(
                f"compress_variants: must be 'best' or 'all', got {self.compress_variants!r}"
            )


def _read_marker(marker: Path, log) -> dict | None:
    """What the data folder was generated with; an unreadable marker means generate again."""
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        log(f"data: {marker} is unreadable; the data set is generated again")
        return None


def _data(cfg: PipelineConfig, log) -> str:
    if cfg.data.path:
        return cfg.data.path
    from capfleet.model import shapes

    root = place(cfg.out) / "data"
    marker = root / "capfleet-data.json"
    want = {"generator": "shapes", "images": cfg.data.images, "seed": cfg.data.seed}
    if _read_marker(marker, log) == want:
        log(f"data: {root} already holds {cfg.data.images} shapes images (seed {cfg.data.seed})")
        return str(root)
    t0 = time.perf_counter()
    with staging(root, last=(marker.name,)) as folder:  # in a store: published, marker last
        counts = shapes.generate(folder, cfg.data.images, cfg.data.seed)
        write_json_atomic(Path(folder) / marker.name, want)
    log(f"data: {sum(counts.values())} shapes images {counts} in {time.perf_counter() - t0:.0f} s")
    return str(root)


def bundle_name(trial: dict) -> str:
    """The caption job's model name for a trial's bundle, e.g. "base-int8"."""
    from capfleet.compression.records import label
    from capfleet.compression.settings import slug

    return slug(f"{trial['model']}-{label(trial)}")


def _study_table(trials: list[dict], caption_rows: list[dict]) -> list[str]:
    """The study's table shape, one row per bundle: model | BLEU | CIDEr-D | ROUGE-L | size MB |
    time for 2000 (every score on the same test images)."""
    from capfleet.compression.records import label, minutes_per_2000

    thr = {r["model"]: r["throughput_img_s"] for r in caption_rows}
    head = (
        f"{'model':<44} {'BLEU-1':>7} {'BLEU-4':>7} {'CIDEr-D':>7} {'ROUGE-L':>7} "
        f"{'size MB':>8} {'2000 imgs (min)':>15} {'job img/s':>9}"
    )

    def score(v) -> str:
        return f"{v:>7.3f}" if v is not None else f"{'-':>7}"

    lines = [head, "-" * len(head)]
    for r in sorted(trials, key=lambda r: (r["model"], -r["size_mb"])):
        name = f"{r['model']}/{label(r)}"
        job = thr.get(bundle_name(r))
        lines.append(
            f"{name:<44} {r['bleu1']:>7.3f} {r['bleu4']:>7.3f} {score(r.get('cider_d'))} "
            f"{score(r.get('rouge_l'))} {r['size_mb']:>8.3f} "
            f"{minutes_per_2000(r['e2e_ms']):>15.3f} {(f'{job:.0f}' if job else '-'):>9}"
        )
    return lines + [
        "2000 imgs (min): the trial's timing, one batch of preprocessed images on its threads, "
        "no fetch or decode (the study's measure);",
        "job img/s: the caption job's images captioned per second, every actor, fetch and "
        "decode included (what a fleet gets). They can rank int8 and fp32 differently.",
    ]


def run_pipeline(cfg: PipelineConfig, address: str | None = None, log: Callable = print) -> dict:
    """Run every step; returns where the outputs are and the best bundle's scores (job.json
    has them too)."""
    run = JobRun("pipeline", cfg.out, asdict(cfg), log)
    with run:
        with run.ray(address):  # one Ray for every step; its messages to OUT/capfleet.log
            result = _steps(cfg, local(cfg.out), address, log)
        run.finish(**{k: v for k, v in result.items() if k != "wall_seconds"})
    return result


def _steps(cfg: PipelineConfig, out: Path, address: str | None, log: Callable) -> dict:
    from capfleet.cluster.connect import ray_session
    from capfleet.compression.records import label, read_trials
    from capfleet.jobs.caption.caption_config import CaptionConfig
    from capfleet.jobs.caption.job import run_caption_job
    from capfleet.jobs.caption.parts import PlanMismatch
    from capfleet.jobs.compress.trials import run_compress_job
    from capfleet.jobs.train.variants import run_train_job

    t0 = time.perf_counter()
    data = _data(cfg, log)
    with ray_session(address):  # the one run_pipeline opened
        grid = _with_data(cfg.train, data)
        variants = run_train_job(grid, log=log).to_pylist()
        ok = [v for v in variants if v["status"] == "ok"]
        if not ok:
            raise CapfleetError(f"every variant failed, e.g. {variants[0]['error']}")
        best_variant = min(ok, key=_dev_nll)  # chosen on dev, not on the test split
        if cfg.compress_variants == "best":
            ok = [best_variant]
            log(f"pipeline: compressing {ok[0]['variant']}, the best dev cross-entropy")
        models = tuple(v["model_dir"] for v in ok)
        compress = replace(cfg.compress, models=models)
        run_compress_job(compress, log=log)
        trials = [r for r in read_trials(compress.out) if r["status"] == "ok"]
        if not trials:
            raise CapfleetError(f"every trial failed; see {compress.out}/report.md")
        best = place(best_variant["model_dir"]).name
        names = [parse_trial(t).name for t in cfg.caption.trials]
        chosen = {r["trial"]: r for r in trials if r["model"] == best and r["trial"] in names}
        if not chosen:
            raise CapfleetError(f"none of the caption trials {names} succeeded for {best}")
        bundles = [chosen[n]["bundle"] for n in names if n in chosen]
        caption = CaptionConfig(
            bundles=tuple(bundles),
            input=data,
            out=str(out / "caption"),
            split=cfg.caption.split,
            batch_size=cfg.caption.batch_size,
            shard_size=cfg.caption.shard_size,
            actors=cfg.caption.actors,
            actor_cpus=cfg.caption.actor_cpus,
            decode_cpus=cfg.caption.actor_cpus,
            address=address or "",  # on a cluster, local bundles are shipped to every node
            names=tuple(bundle_name(chosen[n]) for n in names if n in chosen),
        )
        try:
            run_caption_job(caption, log=log)
        except PlanMismatch as e:  # retrained variants, new trials or new data: caption again
            if is_uri(caption.out):  # an object store renames nothing
                raise CapfleetError(f"{e}; give the pipeline a new out") from None
            kept = _set_aside(Path(caption.out))
            log(f"pipeline: {e}; the earlier captions are kept in {kept}, captioning again")
            run_caption_job(caption, log=log)
    summary = read_parquet(out / "caption" / "summary.parquet").to_pylist()
    top = max(trials, key=lambda r: r["bleu4"])
    lines = _study_table(trials, summary)
    wall = time.perf_counter() - t0
    for line in lines:
        log(line)
    log(
        f"pipeline: done in {wall / 60:.1f} min. Best BLEU-4 {top['bleu4']:.3f} "
        f"({top['model']}/{label(top)}). Outputs: {out}/data, {out}/train "
        f"(variants.parquet), {out}/compress (trials.parquet, report.md, report.png, "
        "gallery.html), "
        f"{out}/caption (captions/, summary.parquet)"
    )
    return {
        "wall_seconds": round(wall, 1),
        "best": {"model": top["model"], "trial": top["trial"], "bleu4": top["bleu4"]},
        "table": lines,
        "report": str(place(compress.out) / "report.md"),
    }


def _set_aside(folder: Path) -> Path:
    """Move an output folder out of the way (renamed, nothing deleted); returns where it went."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = folder.with_name(f"{folder.name}.replaced-{stamp}")
    folder.rename(target)
    return target


def _dev_nll(variant: dict) -> float:
    """A variant's plain dev cross-entropy at the epoch early stopping keeps (the best dev
    loss), chosen on dev, never on the test split. Not the loss itself: with label smoothing
    that grows with the smoothing, and variants may differ in it."""
    history = read_model_manifest(variant["model_dir"])["history"]
    loss = history.get("val_loss") or [float("inf")]
    kept = loss.index(min(loss))
    return history["val_nll"][kept] if "val_nll" in history else loss[kept]


def _with_data(grid: TrainGrid, data: str) -> TrainGrid:
    return TrainGrid(grid.out, tuple(replace(v, data=data) for v in grid.variants), grid.names)

"""capfleet's Python API: the jobs a script or notebook runs, on the same frozen configs that
spec files load into, returning what a script needs next (paths and tables). The CLI is a thin
layer over these functions. A bad input raises CapfleetError before any work; nothing here
exits the process.

    import capfleet
    done = capfleet.caption(bundles=["runs/demo/compress/bundles/*/int8_int8"],
                            input="photos/", out="runs/photos")
    done.summary.to_pandas()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from capfleet.core.errors import CapfleetError
from capfleet.core.storage import place, read_parquet
from capfleet.jobs.caption.caption_config import PLAN_CPUS, CaptionConfig
from capfleet.jobs.compress.compress_config import CompressConfig
from capfleet.jobs.pipeline import PipelineConfig
from capfleet.model.train_config import TrainConfig, TrainGrid

Log = Callable[[str], None]


@dataclass(frozen=True)
class CaptionResult:
    """A finished caption job: OUT, its captions/ folder, summary.parquet and job.json."""

    out: Path  # or a StorePath (core.storage) for an object store
    captions: Path  # OUT/captions/NAME/part-*.parquet
    summary: pa.Table  # one row per model
    job: dict  # job.json

    def rows(self, model: str | None = None) -> pa.Table:
        """Every caption row written (all models, or one)."""
        from capfleet.jobs.caption.parts import read_captions

        return read_captions(self.out, model)


@dataclass(frozen=True)
class CompressResult:
    """A finished compress job: one trials.parquet row per (model, trial), and the report."""

    out: Path  # or a StorePath (core.storage) for an object store
    trials: pa.Table
    report: Path  # OUT/report.md (report.png beside it)
    ok: int
    failed: int
    gallery: Path | None = None  # OUT/gallery.html; None with gallery = 0
    # a [compress.goal] search: whether a candidate met the goal, the winner, OUT/best/ (its
    # bundle) and OUT/choice.md (every candidate and why); None for a list of trials
    met: bool | None = None
    winner: str | None = None
    best: Path | None = None
    choice: Path | None = None


@dataclass(frozen=True)
class TrainResult:
    """Trained models: one variants.parquet row per variant (one row for a single model)."""

    out: Path  # the model directory, or the parent of a grid's variants
    variants: pa.Table
    ok: int
    failed: int


@dataclass(frozen=True)
class PipelineResult:
    """A finished pipeline: the tables of its steps and the best bundle."""

    out: Path  # or a StorePath (core.storage) for an object store
    variants: pa.Table
    trials: pa.Table
    summary: pa.Table
    best: dict  # model, trial, bleu4 of the best bundle
    table: list[str]  # the comparison, as printed


def _config(cls, config, fields: dict):
    """`config` itself, or one built from keyword fields (lists become tuples)."""
    if config is not None and fields:
        raise CapfleetError(f"give a {cls.__name__} or its fields, not both")
    if config is not None:
        return config
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CapfleetError(
            f"{cls.__name__} has no field {', '.join(map(repr, unknown))}; "
            f"its fields: {', '.join(sorted(known))}"
        )
    try:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except TypeError as e:  # a required field left out
        raise CapfleetError(f"{cls.__name__}: {e}") from e


def caption(
    config: CaptionConfig | None = None,
    *,
    address: str | None = None,
    log: Log = print,
    verbose: bool = False,
    retry_errors: bool = False,
    **fields,
) -> CaptionResult:
    """Caption an image set with one or more bundles on Ray (embedded unless an address).
    Ray's own messages go to OUT/capfleet.log (and the console too with `verbose`). With
    `retry_errors` a rerun captions its error rows again. Shards whose workers kept failing
    are counted in `job["shards"]["failed"]` (their rows are error rows; rerun to retry)."""
    from capfleet.jobs.caption.job import run_caption_job

    cfg = _config(CaptionConfig, config, fields)
    if address:
        cfg = dataclasses.replace(cfg, address=address)
    job = run_caption_job(cfg, log=log, verbose=verbose, retry_errors=retry_errors)
    out = place(cfg.out)
    return CaptionResult(out, out / "captions", read_parquet(out / "summary.parquet"), job)


def compress(
    config: CompressConfig | None = None, *, address: str | None = None, log: Log = print, **fields
) -> CompressResult:
    """Run every compression trial of `config` on Ray, or with a goal, search for the bundle
    that meets it (CompressResult.best)."""
    from capfleet.compression.records import TRIALS_FILE
    from capfleet.jobs.compress.search import run_goal_search
    from capfleet.jobs.compress.trials import run_compress_job

    cfg = _config(CompressConfig, config, fields)
    job = (run_goal_search if cfg.goal else run_compress_job)(cfg, address, log=log)
    out = place(cfg.out)
    trials = read_parquet(out / TRIALS_FILE)
    path = lambda key: place(job[key]) if job.get(key) else None  # noqa: E731
    return CompressResult(
        out,
        trials,
        place(job["report"]),
        job["ok"],
        job["failed"],
        path("gallery"),
        job.get("met"),
        job.get("winner"),
        path("best"),
        path("choice"),
    )


def train(
    config: TrainConfig | TrainGrid | None = None,
    *,
    address: str | None = None,
    log: Log = print,
    **fields,
) -> TrainResult:
    """Train one captioner (in this process, or as one Ray task with an address), or every
    variant of a TrainGrid as Ray tasks."""
    from capfleet.jobs.train.variants import VARIANT_SCHEMA, run_train_job, variant_row

    cfg = config if isinstance(config, TrainGrid) else _config(TrainConfig, config, fields)
    if isinstance(cfg, TrainConfig) and not address:
        from capfleet.core.artifacts import OutputLock
        from capfleet.jobs.train.variants import train_anywhere

        with OutputLock(cfg.out, "train job", log):  # one writer per model directory
            row = variant_row(place(cfg.out).name, cfg, train_anywhere(cfg, log), None)
        table = pa.Table.from_pylist([row], schema=VARIANT_SCHEMA)
        out = place(cfg.out)
    else:
        if isinstance(cfg, TrainGrid):
            table = run_train_job(cfg, address, log=log)
        else:  # one model as a one-variant grid; the lock is its own folder's, not the parent's
            from capfleet.core.artifacts import OutputLock

            with OutputLock(cfg.out, "train job", log):
                table = run_train_job(_single_grid(cfg), address, log=log, frame=False)
        out = place(cfg.out)
    ok = table.column("status").to_pylist().count("ok")
    return TrainResult(out, table, ok, len(table) - ok)


def _single_grid(cfg: TrainConfig) -> TrainGrid:
    """One model as a one-variant grid: on a cluster it trains as one Ray task."""
    return TrainGrid(str(place(cfg.out).parent), (cfg,), (place(cfg.out).name,))


def pipeline(
    config: PipelineConfig, *, address: str | None = None, log: Log = print
) -> PipelineResult:
    """data -> train variants -> compression trials -> caption, in one Ray session."""
    from capfleet.jobs.pipeline import run_pipeline

    done = run_pipeline(config, address, log=log)
    out = place(config.out)
    tables = [
        read_parquet(p)
        for p in (
            out / "train" / "variants.parquet",
            out / "compress" / "trials.parquet",
            out / "caption" / "summary.parquet",
        )
    ]
    return PipelineResult(out, *tables, done["best"], done["table"])


Config = TrainConfig | TrainGrid | CompressConfig | CaptionConfig | PipelineConfig


@dataclass(frozen=True)
class PlanResult:
    """A caption job's estimated time and cost per cluster size (capfleet plan)."""

    table: list[dict]  # per cluster size: cpus, wall_s, images_per_s, cpu_hours[, cost]
    text: str  # the table as Markdown, with what was measured and what is assumed
    json: str  # everything, for other tools
    calibration: object  # jobs.caption.planner.Calibration: what the calibration runs measured


def plan(
    spec: str | Path | CaptionConfig,
    *,
    images: int,
    cpus: Sequence[float] = PLAN_CPUS,
    price_per_cpu_hour: float | None = None,
    sample: int = 4096,
    log: Log = print,
) -> PlanResult:
    """Calibrate a caption spec on a sample of its input, here, and estimate the job of
    `images` images on clusters of `cpus` CPUs (and this machine)."""
    from capfleet.jobs.caption.planner import calibrate, plan_json, plan_table, render_plan
    from capfleet.jobs.specs import load_spec

    cfg = load_spec(spec, "caption") if isinstance(spec, (str, Path)) else spec
    if not isinstance(cfg, CaptionConfig):
        raise CapfleetError(f"plan needs a caption spec, got a {type(cfg).__name__}")
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise CapfleetError(f"images: a positive number of images, got {images!r}")
    bad = [c for c in cpus if not (isinstance(c, (int, float)) and 0 < c <= 10**7)]
    if bad or not cpus:
        raise CapfleetError(f"cpus: positive cluster sizes, got {list(cpus)!r}")
    if price_per_cpu_hour is not None and not 0 <= price_per_cpu_hour < 10**6:
        raise CapfleetError(f"price_per_cpu_hour: must be >= 0, got {price_per_cpu_hour}")
    cal = calibrate(cfg, sample, log=log)
    rows = plan_table(cal, images, cpus, price_per_cpu_hour)
    return PlanResult(
        rows,
        render_plan(cal, images, rows, price_per_cpu_hour),
        plan_json(cal, images, rows, price_per_cpu_hour),
        cal,
    )


def run(spec: str | Path | Config, *, address: str | None = None, log: Log = print):
    """Run a spec file, or a loaded config of any kind; returns that kind's result."""
    from capfleet.jobs.specs import load_spec

    cfg = load_spec(spec) if isinstance(spec, (str, Path)) else spec
    if isinstance(cfg, PipelineConfig):
        return pipeline(cfg, address=address, log=log)
    if isinstance(cfg, (TrainConfig, TrainGrid)):
        return train(cfg, address=address, log=log)
    if isinstance(cfg, CompressConfig):
        return compress(cfg, address=address, log=log)
    if isinstance(cfg, CaptionConfig):
        return caption(cfg, address=address, log=log)
    raise CapfleetError(f"cannot run a {type(cfg).__name__}")

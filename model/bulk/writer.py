"""Where a caption job's parts go, the resume plan that makes reruns sound, and reading the parts
back. A part is written atomically (capfleet.model.artifacts) with its statistics in its
footer, so a part that exists and reads is whole; one that does not read is redone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from capfleet.model.artifacts import write_bytes_atomic, write_json_atomic
from capfleet.model.bulk.schema import CAPTION_SCHEMA, STATS_KEY
from capfleet.model.bulk.stats import PartStats
from capfleet.model.errors import CapfleetError

PLAN_FILE = "plan.json"


class PlanMismatch(CapfleetError):
    """An output folder was written from other inputs, bundles or settings than this run's."""


PLAN_FORMAT = "capfleet-caption-plan/2"


def bundle_identity(manifest: dict) -> str:
    """What of a bundle changes its captions: every file's sha256 (encoder, decoder step,
    vocabulary), the encoder section (input size, preprocessing) and the captioner config."""
    doc = {
        "files": {n: f.get("sha256") for n, f in sorted(manifest.get("files", {}).items())},
        "encoder": manifest.get("encoder"),
        "config": manifest.get("config"),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def check_plan(out: str | Path, plan: dict) -> None:
    """Resume is by part files, so it is only sound for the same cut of the same inputs into
    the same models. The first run writes OUT/plan.json; a rerun that differs in anything is
    refused naming it, except that new bundle names may be added."""
    path = Path(out) / PLAN_FILE
    plan = {"format": PLAN_FORMAT, **plan}
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            assert isinstance(old, dict) and isinstance(old.get("bundles"), dict)
        except (ValueError, AssertionError, UnicodeDecodeError) as e:
            raise CapfleetError(
                f"{path}: unreadable ({type(e).__name__}); it records what this output was "
                "made from: restore it, or caption into a new --out"
            ) from None
        if old.get("format") != PLAN_FORMAT:
            raise PlanMismatch(
                f"{out}: written by another capfleet version ({old.get('format', 'plan/1')}); "
                "caption into a new --out"
            )
        for key, value in plan.items():
            if key == "bundles":
                changed = [n for n, ident in value.items() if old["bundles"].get(n, ident) != ident]
                if changed:
                    raise PlanMismatch(
                        f"{out}: bundle {changed[0]!r} differs from the one that wrote this "
                        "output (its files, vocabulary or encoder); use a new --out or a new "
                        "bundle name"
                    )
            elif old.get(key) != value:
                raise PlanMismatch(
                    f"{out}: was written with a different {key} ({old.get(key)} vs {value}); "
                    "resume needs the same inputs, shard size and beam width, or use a new --out"
                )
        plan["bundles"] = {**old["bundles"], **plan["bundles"]}
    write_json_atomic(path, plan)


def part_path(out: str | Path, model: str, shard: int) -> Path:
    return Path(out) / "captions" / f"model={model}" / f"part-{shard:06d}.parquet"


def write_part(path: Path, table: pa.Table, stats: PartStats) -> None:
    """A part and its statistics, whole or not at all."""
    meta = {**(table.schema.metadata or {}), STATS_KEY: json.dumps(stats.to_json()).encode()}
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(meta), sink)
    write_bytes_atomic(path, sink.getvalue().to_pybytes())


def part_stats(path: Path) -> PartStats | None:
    """A part's statistics from its footer; None when the part is absent or does not read
    (0 bytes, truncated, no footer): such a part is not done."""
    try:
        meta = pq.read_metadata(path).metadata or {}
        return PartStats.from_json(json.loads(meta[STATS_KEY]))
    except (OSError, KeyError, ValueError, TypeError, pa.ArrowException):
        return None


def part_done(path: Path) -> bool:
    """A part that reads whole and holds captioned rows (not a failed shard's stand-in)."""
    stats = part_stats(path)
    return stats is not None and not stats.retry


def failed_part(shard, model: str, error: str) -> tuple[pa.Table, PartStats]:
    """The rows of a shard whose worker failed (died, or timed out) after its retries: every
    row an error with the reason, so the outputs say what happened to each image; a rerun
    redoes the shard (its statistics say `retry`)."""
    import time

    n = len(shard.image_id)
    table = pa.table(
        {
            "image_id": shard.image_id,
            "uri": shard.uri,
            "model": [model] * n,
            "caption": [None] * n,
            "status": ["error"] * n,
            "error": [error] * n,
            "references": shard.references,
            "shard": [shard.shard] * n,
        }
    )
    table = pa.table(
        {
            f.name: table[f.name] if f.name in table.column_names else pa.nulls(n, f.type)
            for f in CAPTION_SCHEMA
        },
        schema=CAPTION_SCHEMA,
    )
    now = time.time()
    reason = error.split(":", 1)[0]
    return table, PartStats(rows=n, errors={reason: n}, started=now, finished=now, retry=True)


def parts(out: str | Path, model: str) -> Iterator[Path]:
    yield from sorted((Path(out) / "captions" / f"model={model}").glob("part-*.parquet"))


def read_captions(out: str | Path, model: str | None = None, columns=None) -> pa.Table:
    """Every caption row written so far (all models, or one), of parts that read whole (a
    failed shard's error rows included)."""
    root = Path(out) / "captions"
    pattern = f"model={model}/part-*.parquet" if model else "model=*/part-*.parquet"
    found = [p for p in sorted(root.glob(pattern)) if part_stats(p) is not None]
    schema = (
        CAPTION_SCHEMA if columns is None else pa.schema([CAPTION_SCHEMA.field(c) for c in columns])
    )
    if not found:
        return schema.empty_table()
    return pa.concat_tables(pq.read_table(p, columns=columns).cast(schema) for p in found)

"""Where a caption job's parts go, the resume plan that makes reruns sound, and reading the parts
back. Parts are written atomically (capfleet.model.artifacts), so a part that exists is whole.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from capfleet.model.artifacts import write_json_atomic
from capfleet.model.bulk.schema import CAPTION_SCHEMA
from capfleet.model.data import ImageRecord
from capfleet.model.errors import CapfleetError

PLAN_FILE = "plan.json"


def check_plan(
    out: str | Path, cfg_shard_size: int, records: Sequence[ImageRecord], bundles: dict[str, str]
) -> None:
    """Resume is by part files, so it is only sound for the same cut of the same input into
    the same models. The first run writes OUT/plan.json; a rerun that differs is refused."""
    ids = hashlib.sha256("\n".join(r.image_id for r in records).encode()).hexdigest()
    plan = {
        "shard_size": cfg_shard_size,
        "images": len(records),
        "image_ids_sha256": ids,
        "bundles": bundles,
    }
    path = Path(out) / PLAN_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        for key, value in plan.items():
            if key == "bundles":
                changed = [n for n, sha in value.items() if old["bundles"].get(n, sha) != sha]
                if changed:
                    raise CapfleetError(
                        f"{out}: bundle {changed[0]!r} differs from the one that wrote this "
                        "output; use a new --out (or a new bundle name)"
                    )
            elif old.get(key) != value:
                raise CapfleetError(
                    f"{out}: was written with a different {key} ({old.get(key)} vs {value}); "
                    "resume needs the same input and shard size, or use a new --out"
                )
        plan["bundles"] = {**old["bundles"], **bundles}
    write_json_atomic(path, plan)


def part_path(out: str | Path, model: str, shard: int) -> Path:
    return Path(out) / "captions" / f"model={model}" / f"part-{shard:06d}.parquet"


def missing_models(out: str | Path, models: Sequence[str], shard: int) -> list[str]:
    return [m for m in models if not part_path(out, m, shard).is_file()]


def read_captions(out: str | Path, model: str | None = None) -> pa.Table:
    """Every caption row written so far (all models, or one)."""
    root = Path(out) / "captions"
    pattern = f"model={model}/part-*.parquet" if model else "model=*/part-*.parquet"
    parts = sorted(root.glob(pattern))
    if not parts:
        return CAPTION_SCHEMA.empty_table()
    return pa.concat_tables(pq.read_table(p, schema=CAPTION_SCHEMA) for p in parts)

"""Job specs: a TOML file -> a frozen, validated dataclass, refused before any work starts.

    kind = "train"
    [train]
    data = "runs/demo/data"
    out = "runs/demo/train/small_cnn"
    epochs = 30

A train spec may add a [grid] of values to try: every combination is a variant, trained as its
own Ray task into <out>/<variant name> (see TrainGrid). Relative paths are taken from the
directory the command runs in.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import sys
import typing
from pathlib import Path

from capfleet.core.errors import CapfleetError
from capfleet.core.storage import place
from capfleet.jobs.caption.caption_config import CaptionConfig
from capfleet.jobs.compress.compress_config import CompressConfig
from capfleet.jobs.pipeline import CaptionStep, DataStep, PipelineConfig
from capfleet.model.train_config import TrainConfig, TrainGrid

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KINDS = {
    "train": TrainConfig,
    "compress": CompressConfig,
    "caption": CaptionConfig,
    "pipeline": PipelineConfig,
}


def _check_type(where: str, key: str, value, hint):
    """`value` checked against the field's type and converted (a TOML array -> a tuple)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint) and len(args) == 1:  # X | None: a value is an X
        hint = args[0]
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise CapfleetError(f"{where}: {key} must be a table [{key}], got {value!r}")
        return build(hint, value, f"{where}.{key}")
    name = getattr(hint, "__name__", str(hint))
    if name == "tuple":  # tuple[str, ...]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CapfleetError(f"{where}: {key} must be a list of strings, got {value!r}")
        return tuple(value)
    allowed = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}[name]
    ok = isinstance(value, allowed) and not (name != "bool" and isinstance(value, bool))
    if not ok:
        raise CapfleetError(f"{where}: {key} must be {name}, got {value!r}")
    return value


def build(cls, table: dict, where: str):
    """Construct dataclass `cls` from a TOML table: unknown keys, missing keys and wrong types
    are errors naming the key and what is allowed; values are checked by the class itself."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise CapfleetError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    values = {key: _check_type(where, key, value, hints[key]) for key, value in table.items()}
    missing = [
        n
        for n, f in names.items()
        if n not in table
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise CapfleetError(f"{where}: missing required key {missing[0]!r}")
    try:
        return cls(**values)
    except CapfleetError as e:
        raise CapfleetError(f"{where}: {e}") from None


def _format(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def expand_grid(base: dict, grid: dict, where: str) -> TrainGrid:
    """[train] + [grid] -> every variant, each validated; names say what varies."""
    fields = set(TrainConfig.field_names()) - {"data", "out"}
    for key, values in grid.items():
        if key not in fields:
            raise CapfleetError(
                f"{where} [grid]: {key!r} cannot vary; allowed: {', '.join(sorted(fields))}"
            )
        if not isinstance(values, list) or not values:
            raise CapfleetError(f"{where} [grid]: {key} must be a non-empty list of values")
    if "out" not in base:
        raise CapfleetError(f"{where} [train]: missing required key 'out'")
    keys = list(grid)
    variants, names = [], []
    for combo in itertools.product(*(grid[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        name = "-".join(f"{k}={_format(v)}" for k, v in values.items() if len(grid[k]) > 1)
        # a folder name: no separators or '..' from values such as weights paths
        name = re.sub(r"[^A-Za-z0-9._=+-]", "_", name).replace("..", "_") or "base"
        table = {**base, **values, "out": str(place(base["out"]) / name)}
        variants.append(build(TrainConfig, table, f"{where} variant {name}"))
        names.append(name)
    if len(set(names)) != len(names):
        raise CapfleetError(f"{where} [grid]: two variants would share a name")
    return TrainGrid(base["out"], tuple(variants), tuple(names))


def build_pipeline(table: dict, where: str) -> PipelineConfig:
    """[pipeline] with its step tables; the paths between steps are the pipeline's to set."""
    allowed = {"out", "data", "train", "grid", "compress", "caption", "compress_variants"}
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise CapfleetError(
            f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}"
        )
    if not isinstance(table.get("out"), str):
        raise CapfleetError(f"{where}: out must be the output directory (a string)")
    for step in ("data", "train", "grid", "compress", "caption"):
        if not isinstance(table.get(step, {}), dict):
            raise CapfleetError(f"{where}: {step} must be a table [pipeline.{step}]")
    out = place(table["out"])
    data = build(DataStep, table.get("data", {}), f"{where}.data")
    if "goal" in table.get("compress", {}):
        raise CapfleetError(
            f"{where}.compress: a goal search runs as its own compress spec (kind = "
            '"compress") on the model the pipeline trained; a pipeline runs a list of trials'
        )
    for step, keys in (("train", ("data", "out")), ("compress", ("models", "out"))):
        taken = sorted(set(table.get(step, {})) & set(keys))
        if taken:
            raise CapfleetError(f"{where}.{step}: {taken[0]} is set by the pipeline; remove it")
    base = {
        **table.get("train", {}),
        "data": data.path or str(out / "data"),
        "out": str(out / "train"),
    }
    grid = expand_grid(base, table.get("grid", {}), f"{where}.train")
    compress = build(
        CompressConfig,
        {
            **table.get("compress", {}),
            "models": [v.out for v in grid.variants],
            "out": str(out / "compress"),
        },
        f"{where}.compress",
    )
    caption = build(CaptionStep, table.get("caption", {}), f"{where}.caption")
    variants = table.get("compress_variants", "best")
    if not isinstance(variants, str):
        raise CapfleetError(f"{where}: compress_variants must be 'best' or 'all'")
    try:
        return PipelineConfig(str(out), data, grid, compress, caption, variants)
    except CapfleetError as e:
        raise CapfleetError(f"{where}: {e}") from None


def read_spec(path: str | Path) -> dict:
    """A spec file's TOML document; unreadable or invalid files are clear errors."""
    p = Path(path)
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise CapfleetError(f"{p}: cannot read spec ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise CapfleetError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except tomllib.TOMLDecodeError as e:
        raise CapfleetError(f"{p}: invalid TOML ({e})") from e


def load_spec(path: str | Path, expect: str | None = None):
    """Read a spec file; returns the config dataclass of its kind (which must be `expect`, the
    kind a command such as `capfleet train` runs, when given)."""
    p = Path(path)
    doc = read_spec(p)
    kind = doc.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise CapfleetError(f"{p}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if expect and kind != expect:
        raise CapfleetError(f"{p}: `capfleet {expect}` needs a spec of kind '{expect}'")
    allowed = {"kind", kind} | ({"grid"} if kind == "train" else set())
    extra = sorted(set(doc) - allowed)
    if extra:
        raise CapfleetError(
            f"{p}: unknown top-level key {extra[0]!r}; expected {', '.join(sorted(allowed))}"
        )
    table = doc.get(kind)
    if not isinstance(table, dict):
        raise CapfleetError(f"{p}: missing the [{kind}] table")
    if kind == "pipeline":
        return build_pipeline(table, f"{p} [pipeline]")
    if "grid" in doc:
        if not isinstance(doc["grid"], dict):
            raise CapfleetError(f"{p}: grid must be a table [grid]")
        return expand_grid(table, doc["grid"], str(p))
    if kind == "compress" and "goal" in table and "trials" in table:
        raise CapfleetError(
            f"{p} [compress]: a [compress.goal] search chooses its own trials; remove trials "
            "(or the goal, to run exactly those trials)"
        )
    return build(KINDS[kind], table, f"{p} [{kind}]")


# Spec keys whose values name files or folders (a pipeline's [pipeline.data] table holds `path`).
PATH_KEYS = {"input", "out", "references", "bundles", "models", "data", "path", "cache_dir"}


def relative_paths(doc: dict) -> list[str]:
    """`key = value` of every relative local path in a spec document: on a cluster a path is
    the cluster's, and a relative one would resolve inside the job's staging folder."""
    found = []

    def walk(table: dict, where: str) -> None:
        for key, value in table.items():
            name = f"{where}.{key}" if where else key
            if isinstance(value, dict):
                walk(value, name)
                continue
            if key not in PATH_KEYS:
                continue
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, str) and v and "://" not in v and not Path(v).is_absolute():
                    found.append(f"{name} = {v!r}")

    walk(doc, "")
    return found

"""Job specs: a TOML file -> a frozen, validated dataclass, refused before any work starts.

    kind = "train"
    [train]
    data = "runs/demo/data"
    out = "runs/demo/train/small_cnn"
    epochs = 30

Relative paths are taken from the directory the command runs in.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

from compression.trial import CompressConfig
from model.errors import CapfleetError
from model.training import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KINDS = {"train": TrainConfig, "compress": CompressConfig}


def _check_type(where: str, key: str, value, hint):
    """`value` checked against the field's type and converted (a TOML array -> a tuple)."""
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


def load_spec(path: str | Path):
    """Read a spec file; returns the config dataclass of its kind."""
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise CapfleetError(f"{p}: cannot read spec ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise CapfleetError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except tomllib.TOMLDecodeError as e:
        raise CapfleetError(f"{p}: invalid TOML ({e})") from e
    kind = doc.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise CapfleetError(f"{p}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    extra = sorted(set(doc) - {"kind", kind})
    if extra:
        raise CapfleetError(
            f"{p}: unknown top-level key {extra[0]!r}; expected 'kind' and [{kind}]"
        )
    table = doc.get(kind)
    if not isinstance(table, dict):
        raise CapfleetError(f"{p}: missing the [{kind}] table")
    return build(KINDS[kind], table, f"{p} [{kind}]")

"""The import rule (ARCHITECTURE.md): only cluster/ imports ray; imports point down (jobs ->
cluster, compression -> model -> core; cluster -> core only), never up, so cluster/ knows no
job and model/ no job, cluster or compression code; bench/ follows the same rule; every module
name is used once in the tree; and everything is imported through the one namespace,
`capfleet`."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "model", "compression", "cluster", "jobs")
# folder -> what its modules must never import (capfleet subpackages by their full name)
FORBIDDEN = {
    "core": {"ray", "capfleet.model", "capfleet.compression", "capfleet.cluster", "capfleet.jobs"},
    "model": {"ray", "capfleet.jobs", "capfleet.compression", "capfleet.cluster"},
    "compression": {"ray", "capfleet.jobs", "capfleet.cluster"},
    "cluster": {"capfleet.jobs", "capfleet.model", "capfleet.compression"},
    "jobs": {"ray"},
    "bench": {"ray"},  # Ray only through capfleet.cluster
}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, at any depth, as 'a.b.c'."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def breaks(imported: set[str], forbidden: set[str]) -> set[str]:
    return {m for m in imported for f in forbidden if m == f or m.startswith(f + ".")}


def modules_of(folder: str) -> list[Path]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"{folder}/ has no modules"
    return files


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_import_rule(folder):
    bad = {
        str(f.relative_to(ROOT)): sorted(breaks(imported_modules(f), FORBIDDEN[folder]))
        for f in modules_of(folder)
    }
    assert not {f: m for f, m in bad.items() if m}, f"forbidden imports in {folder}/"


@pytest.mark.parametrize("folder", [*PACKAGES, "bench", "tests"])
def test_everything_imports_through_the_capfleet_namespace(folder):
    """`import model` would load a second copy of the package (or a user's own `model`)."""
    bare = set(PACKAGES)
    bad = {
        str(f.relative_to(ROOT)): sorted(m for m in imported_modules(f) if m.split(".")[0] in bare)
        for f in modules_of(folder)
    }
    assert not {f: m for f, m in bad.items() if m}


def test_rule_checker_sees_nested_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import ray.data\n    from capfleet.jobs import api\n")
    assert breaks(imported_modules(f), FORBIDDEN["cluster"] | {"ray"}) == {
        "ray.data",
        "capfleet.jobs",
        "capfleet.jobs.api",
    }


def test_every_module_name_is_used_once():
    """A name says one role: no `report.py` in two packages, no `decode` beside `decoding`."""
    seen: dict[str, list[str]] = {}
    for folder in PACKAGES:
        for f in modules_of(folder):
            if f.name != "__init__.py":
                seen.setdefault(f.stem, []).append(str(f.relative_to(ROOT)))
    assert not {n: fs for n, fs in seen.items() if len(fs) > 1}
    assert not {"decode", "decoding"} <= set(seen)

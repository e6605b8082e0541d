"""The import rule (ARCHITECTURE.md): only cluster/ imports ray; model/, compression/ stay pure."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> top-level modules it must never import
FORBIDDEN = {
    "model": {"ray", "jobs", "compression", "cluster"},
    "compression": {"ray", "jobs", "cluster"},
    "jobs": {"ray"},
    "cluster": set(),
}


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_rule(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    bad = {
        str(f.relative_to(ROOT)): sorted(imported_top_levels(f) & FORBIDDEN[package]) for f in files
    }
    assert not {f: m for f, m in bad.items() if m}, f"forbidden imports in {package}/"


def test_rule_checker_sees_nested_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import ray.data\n    from ray import remote\n")
    assert imported_top_levels(f) == {"ray"}

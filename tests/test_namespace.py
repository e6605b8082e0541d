"""The distribution adds one import name, `capfleet`: a wheel built from this checkout holds
nothing else, and the generic folder names (model, jobs...) are not importable outside it."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_built_wheel_adds_only_the_capfleet_package(tmp_path):
    # built from a copy: setuptools writes build/ and *.egg-info beside the sources
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".*", "runs", "build", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, src, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["--wheel-dir", str(tmp_path / "dist"), str(src)],
        check=True,
        capture_output=True,
    )
    [wheel] = (tmp_path / "dist").glob("capfleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"capfleet", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for pkg in ("model", "compression", "cluster", "jobs"):  # every (sub)package, every module
        for f in (ROOT / pkg).rglob("*.py"):
            assert f"capfleet/{f.relative_to(ROOT).as_posix()}" in names, f
    assert "capfleet/jobs/examples/demo.toml" in names  # what `capfleet demo` reads
    assert not any(n.startswith(("capfleet/tests/", "capfleet/bench/")) for n in names)


def test_outside_the_repository_only_capfleet_imports(tmp_path):
    probe = (
        "import importlib, capfleet.model.bundle, capfleet.jobs.cli\n"
        "for name in ('model', 'jobs', 'cluster', 'compression'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "    raise SystemExit(f'{name} is importable')\n"
        "print(sorted(capfleet.__all__))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    for name in ("caption", "compress", "train", "run", "CaptionConfig", "CapfleetError"):
        assert f"'{name}'" in out.stdout


def test_a_user_module_named_model_does_not_shadow_capfleet(tmp_path):
    (tmp_path / "model.py").write_text("raise ImportError('the user model was imported')\n")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "__init__.py").write_text("")
    out = subprocess.run(
        [sys.executable, "-c", "import capfleet.jobs.cli, capfleet.model.bundle"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr

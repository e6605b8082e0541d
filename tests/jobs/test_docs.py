"""Every `runs/demo/...` path that README.md, docs/ and the example specs name is one that
`make demo` writes (derived from the demo's own spec: its variants, its trials' bundle folders)
or the output of a command those pages show, so that a user can paste them after `make demo`."""

import fnmatch
import re
from pathlib import Path

from capfleet.compression.recipes import parse_trial
from capfleet.compression.settings import slug
from capfleet.jobs.cli import DEMO_SPEC
from capfleet.jobs.specs import build_pipeline, read_spec

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SPECS = sorted((ROOT / "jobs" / "examples").glob("*.toml"))
PATH = re.compile(r"runs/demo(?:/[^\s\"'`),\]]*)?")
OUTPUT = re.compile(r"(?:--out\s+|\bout\s*=\s*\")(runs/[^\s\"'`]+)")


def demo_writes() -> set[str]:
    cfg = build_pipeline(read_spec(DEMO_SPEC)["pipeline"], str(DEMO_SPEC))
    out = cfg.out.rstrip("/")
    paths = {out, f"{out}/data", f"{out}/data/Flicker8k_Dataset", f"{out}/caption"}
    paths |= {f"{out}/train", f"{out}/compress", f"{out}/compress/bundles"}
    for name in cfg.train.names:
        paths.add(f"{out}/train/{name}")
        paths.add(f"{out}/compress/bundles/{name}")
        for trial in cfg.compress.trials:
            paths.add(f"{out}/compress/bundles/{name}/{slug(parse_trial(trial).name)}")
    return paths


def test_every_demo_path_the_docs_name_exists_after_make_demo():
    writes = demo_writes()
    texts = {p: p.read_text() for p in [*PAGES, *SPECS]}
    outputs = {m.rstrip("/.") for t in texts.values() for m in OUTPUT.findall(t)}
    bad = []
    for page, text in texts.items():
        for ref in {m.rstrip("/.") for m in PATH.findall(text)}:
            made = any(fnmatch.fnmatch(w, ref) for w in writes)
            produced = any(ref == o or ref.startswith(o + "/") for o in outputs)
            if not made and not produced:
                bad.append(f"{page.relative_to(ROOT)}: {ref}")
    assert not bad, "paths that `make demo` does not write:\n" + "\n".join(sorted(bad))


def test_the_check_knows_the_demos_bundle_folders():
    writes = demo_writes()
    assert any(fnmatch.fnmatch(w, "runs/demo/compress/bundles/*/int8_int8") for w in writes)
    assert not any(w.endswith("int8__int8") for w in writes)  # the name once written wrong

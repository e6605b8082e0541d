"""trials.parquet deltas, report.md, the matplotlib report plot and the compress gallery, on
records made here (no training, no Ray)."""

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from capfleet.compression.records import (
    TRIAL_CAPTIONS_SCHEMA,
    TRIAL_SCHEMA,
    with_deltas,
    write_trials,
)
from capfleet.core.errors import CapfleetError
from capfleet.jobs.compress.compress_config import CompressConfig
from capfleet.jobs.compress.trial_gallery import write_compress_gallery
from capfleet.jobs.compress.trial_report import render_markdown, render_plot, write_report


def _records():
    recs = []
    for model, scale in (("small", 1.0), ("big", 3.0)):
        for trial, size, ms, b4, cider in (
            ("fp32:fp32", 4.0, 2.0, 0.80, 1.90),
            ("int8:int8", 1.0, 1.2, 0.78, 1.80),
            ("int8:qat-int8", 1.0, 1.25, 0.795, 1.88),
            ("shrink-50+int8:shrink-50+int8", 0.3, 0.5, 0.76, 1.70),
        ):
            recs.append(
                {
                    "model": model,
                    "trial": trial,
                    "status": "ok",
                    "size_mb": size * scale,
                    "gzip_mb": size * scale * 0.8,
                    "e2e_ms": ms * scale,
                    "bleu1": b4 + 0.1,
                    "bleu4": b4,
                    "cider_d": cider,
                    "rouge_l": 0.6,
                    "test_images": 100,
                    "bench_batch": 32,
                    "bench_threads": 1,
                    "encoder_sparsity": 0.0,
                    "decoder_sparsity": 0.0,
                }
            )
    recs.append({"model": "small", "trial": "prune-50:prune-50", "status": "error", "error": "x"})
    return recs


def test_deltas_of_every_score_against_the_baseline():
    rows = {(r["model"], r["trial"]): r for r in with_deltas(_records())}
    qat = rows[("small", "int8:qat-int8")]
    assert qat["delta_bleu4"] == pytest.approx(-0.005)
    assert qat["delta_cider_d"] == pytest.approx(-0.02)
    assert qat["delta_rouge_l"] == pytest.approx(0.0)
    assert rows[("small", "fp32:fp32")]["delta_cider_d"] == 0.0
    assert rows[("small", "prune-50:prune-50")]["delta_cider_d"] is None
    # a record from before CIDEr-D was scored: no delta, rather than a wrong one
    old = [{**r, "cider_d": None} if r["trial"] == "int8:int8" else r for r in _records()]
    rows = {(r["model"], r["trial"]): r for r in with_deltas(old)}
    assert rows[("small", "int8:int8")]["delta_cider_d"] is None
    assert rows[("small", "int8:int8")]["delta_bleu4"] == pytest.approx(-0.02)
    assert pa.Table.from_pylist(with_deltas(_records()), schema=TRIAL_SCHEMA).num_rows == 9


def test_report_md_shows_the_new_scores_on_one_image_set():
    md = render_markdown(with_deltas(_records()), gallery="gallery.html")
    head = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert "| CIDEr-D | ROUGE-L |" in head and "| ΔCIDEr-D |" in head
    qat = next(line for line in md.splitlines() if line.startswith("| small | int8:qat-int8 |"))
    cells = [c.strip() for c in qat.strip("|").split("|")]
    assert cells[4:6] == ["1.880", "0.600"] and cells[12] == "-0.020"
    assert "same test images" in md and "compares only with figures on the same image set" in md
    assert "Test images scored per model: big: 100; small: 100." in md
    front = re.search(r"Pareto front for small: .*size vs CIDEr-D: ([^;]+);", md).group(1)
    assert set(front.split(", ")) == {"shrink-50+int8", "int8:qat-int8", "fp32"}  # not int8
    assert "[gallery.html](gallery.html)" in md
    assert "gallery" not in render_markdown(with_deltas(_records()))


def test_report_plot_is_a_readable_png(tmp_path):
    write_trials(tmp_path, _records())
    write_report(tmp_path)
    with Image.open(tmp_path / "report.png") as img:
        assert img.format == "PNG"
        img.verify()
    img = np.asarray(Image.open(tmp_path / "report.png").convert("RGB"))
    assert 1000 <= img.shape[1] <= 3000 and 700 <= img.shape[0] <= 3000
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50
    # both models' colours (tab10 blue and red) are on the page
    for rgb in ((31, 119, 180), (214, 39, 40)):
        assert (np.abs(img.astype(int) - rgb).sum(axis=2) < 30).sum() > 100, rgb
    # nothing succeeded: still a valid page, not a crash
    empty = render_plot([r for r in _records() if r["status"] == "error"])
    assert empty[:8] == b"\x89PNG\r\n\x1a\n"


def _captions(path, ids, prefix, score):
    rows = [
        {
            "image_id": i,
            "uri": None,
            "caption": f"{prefix} {i}" if i != "img1" else "the same caption",
            "references": [f"ref of {i}"],
            "cider_d": score,
            "rouge_l": 0.5,
            "sentence_bleu4": 0.25,
        }
        for i in ids
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=TRIAL_CAPTIONS_SCHEMA), path)


def test_compress_gallery_columns_per_trial(tmp_path):
    ids = [f"img{i}" for i in range(30)]
    _captions(tmp_path / "a.parquet", ids, "fp32 says", 1.5)
    _captions(tmp_path / "b.parquet", ids, "int8 says", 0.5)
    ok = {"status": "ok"}
    trials = [
        ("fp32:fp32", ok, tmp_path / "a.parquet"),
        ("int8:int8", ok, tmp_path / "b.parquet"),
        ("prune-50:prune-50", {"status": "error", "error": "OOM\ntrace"}, tmp_path / "c.parquet"),
        ("old:old", ok, tmp_path / "missing.parquet"),  # recorded before captions were kept
    ]
    page = write_compress_gallery(tmp_path, trials, 10).read_text()
    rows = re.findall(r'<tr class="item" data-id="(\w+)"', page)
    assert len(rows) == 10 and rows == sorted(rows)
    assert "<th>fp32:fp32</th><th>int8:int8</th><th>prune-50:prune-50</th>" in page
    assert "old:old" not in page
    assert page.count("trial failed: OOM") == 10
    assert 'data-id="img1" data-disagree="0"' in page or "img1" not in rows
    assert "CIDEr-D 1.500" in page and "ref of " in page
    assert write_compress_gallery(tmp_path, trials, 0) is None
    assert write_compress_gallery(tmp_path, trials[2:], 10) is None  # no captions at all


def test_gallery_setting_is_checked(tmp_path):
    CompressConfig(models=("m",), out=str(tmp_path), gallery=0)
    for bad in (-1, 100_000, 2.5):
        with pytest.raises(CapfleetError, match="gallery"):
            CompressConfig(models=("m",), out=str(tmp_path), gallery=bad)

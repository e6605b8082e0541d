"""Compression trials as tasks on a real local Ray: a small grid, two trials at once, one
model made to fail, a rerun that redoes only the failed trials, and one that redoes the trials
of a retrained model."""

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from capfleet.compression.settings import TrialSettings
from capfleet.jobs.compress.compress_config import CompressConfig


@pytest.mark.slow
def test_trial_grid_on_ray(local_ray, tiny_model, tmp_path):
    from capfleet.jobs.compress.trials import run_compress_job

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "weights.h5").write_bytes(b"not hdf5")
    cfg = CompressConfig(
        models=(str(tiny_model), str(broken)),
        out=str(tmp_path / "out"),
        trials=("int8",),
        cpus_per_trial=1.0,
        max_retries=0,
        settings=TrialSettings(
            finetune_epochs=1, shrink_epochs=1, eval_images=8, bench_batch=8, bench_repeats=1
        ),
    )
    lines = []
    job = run_compress_job(cfg, log=lines.append)
    assert (job["trials"], job["ok"], job["failed"]) == (4, 2, 2)
    rows = pq.read_table(tmp_path / "out" / "trials.parquet").to_pylist()
    ok = {r["trial"]: r for r in rows if r["model"] == "tiny"}
    assert set(ok) == {"fp32:fp32", "int8:int8"}
    for r in ok.values():
        assert r["status"] == "ok" and r["error"] is None
        assert r["e2e_ms"] > 0 and r["size_mb"] > 0 and r["gzip_mb"] > 0
        assert 0.0 <= r["bleu4"] <= 1.0 and r["bench_batch"] == 8
    base = ok["fp32:fp32"]
    assert base["size_ratio"] == 1.0 and base["delta_bleu4"] == 0.0
    assert ok["int8:int8"]["size_ratio"] < 0.35
    spans = sorted((r["started"], r["finished"]) for r in ok.values())
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False)), (
        "no two trials ran at once"
    )
    failed = [r for r in rows if r["model"] == "broken"]
    assert len(failed) == 2 and all(r["status"] == "error" for r in failed)
    assert all("cannot load the model's weights" in r["error"] for r in failed)
    assert sum(line.startswith("[") for line in lines) == 4  # a progress line per trial
    assert (tmp_path / "out" / "report.md").read_text().count("| tiny |") == 2
    assert (tmp_path / "out" / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert all(r["cider_d"] is not None and r["rouge_l"] is not None for r in ok.values())
    assert base["delta_cider_d"] == 0.0 and base["delta_rouge_l"] == 0.0
    # the gallery: every trial's caption of each sampled test image; the broken model's
    # trials show their error
    assert job["gallery"] == str(tmp_path / "out" / "gallery.html")
    page = (tmp_path / "out" / "gallery.html").read_text()
    assert page.count('<tr class="item"') == 8  # the whole 8-image test split (< 200)
    for trial in ok:
        assert f"<th>tiny {trial}</th>" in page and f"<th>broken {trial}</th>" in page
    assert page.count('<td class="cap ok') == 8 * 2 and page.count('<td class="cap error') == 8 * 2
    assert "[gallery.html](gallery.html)" in (tmp_path / "out" / "report.md").read_text()

    (broken / "weights.h5").unlink()  # the rerun retries only the failed trials
    shutil.copy(tiny_model / "weights.h5", broken / "weights.h5")
    lines.clear()
    job = run_compress_job(cfg, log=lines.append)
    assert (job["ok"], job["failed"]) == (4, 0)
    assert "2 of 4 trials already done" in lines[0]
    again = pq.read_table(tmp_path / "out" / "trials.parquet").to_pylist()
    assert [(r["model"], r["trial"]) for r in again] == [(r["model"], r["trial"]) for r in rows]

    manifest = broken / "manifest.json"  # retrained: its earlier trials describe another model
    manifest.write_text(manifest.read_text().replace("{", '{"retrained": true, ', 1))
    lines.clear()
    job = run_compress_job(cfg, log=lines.append)
    assert (job["ok"], job["failed"]) == (4, 0)
    assert "2 of 4 trials already done" in lines[0]
    assert "2 earlier trials redone: their model or settings changed" in lines[1]


def test_trials_of_a_model_whose_data_changed_are_redone(
    local_ray, tiny_model, shapes_dir, tmp_path
):
    import json

    from capfleet.jobs.compress.trials import run_compress_job

    data, model = tmp_path / "data", tmp_path / "tiny"
    shutil.copytree(shapes_dir, data)
    shutil.copytree(tiny_model, model)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["train"]["data"] = str(data)
    (model / "manifest.json").write_text(json.dumps(manifest))
    cfg = CompressConfig(
        models=(str(model),),
        out=str(tmp_path / "out"),
        trials=("fp32",),
        gallery=0,
        settings=TrialSettings(eval_images=8, bench_batch=8, bench_repeats=1),
    )
    run_compress_job(cfg, log=lambda _: None)
    lines: list = []
    run_compress_job(cfg, log=lines.append)
    assert "1 of 1 trials already done" in lines[0] and not any("redone" in x for x in lines)
    tokens = data / "Flickr8k.token.txt"  # the references it is scored on change
    tokens.write_text(tokens.read_text().replace("small", "tiny", 3))
    lines.clear()
    run_compress_job(cfg, log=lines.append)
    assert any("1 earlier trials redone" in x and "their data" in x for x in lines), lines


def test_a_model_that_moved_finds_its_data_or_names_the_key_to_set(
    tiny_model, shapes_dir, tmp_path, monkeypatch
):
    import json
    import shutil

    from capfleet.core.errors import CapfleetError
    from capfleet.jobs.compress.compress_config import checked_plan
    from capfleet.model.modeldir import model_data, read_model_manifest

    # the model and its data copied together elsewhere, the originals' paths gone for good
    home = tmp_path / "elsewhere"
    shutil.copytree(tiny_model, home / "models" / "tiny")
    shutil.copytree(shapes_dir, home / "data")
    moved = home / "models" / "tiny"
    manifest = read_model_manifest(moved)
    manifest["train"]["data"] = "runs/gone/data"  # as a relative path training was given
    manifest["data_from_model"] = "../../data"
    (moved / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)  # run from another folder
    assert model_data(moved, manifest) == str(moved / "../../data")
    cfg = CompressConfig(models=(str(moved),), out=str(tmp_path / "o"), trials=("fp32",))
    assert checked_plan(cfg) == [(str(moved), "fp32:fp32")]
    shutil.rmtree(home / "data")
    with pytest.raises(CapfleetError, match=r"set `data` in the compress spec"):
        checked_plan(cfg)  # refused before any Ray starts, naming the key
    again = CompressConfig(
        models=(str(moved),), out=str(tmp_path / "o"), trials=("fp32",), data=str(shapes_dir)
    )
    assert checked_plan(again) and model_data(moved, manifest, again.data) == str(shapes_dir)


def test_a_trained_model_records_its_data_from_the_model_directory(tiny_model, shapes_dir):
    import os

    from capfleet.model.modeldir import read_model_manifest

    rel = read_model_manifest(tiny_model)["data_from_model"]
    assert os.path.realpath(os.path.join(tiny_model, rel)) == os.path.realpath(shapes_dir)


def test_a_mixed_int8_trial_ships_layers_as_its_manifest_says_and_reports_sensitivity(
    local_ray, tiny_model, tmp_path
):
    import json

    from capfleet.compression.mixed import precisions
    from capfleet.jobs.compress.trials import run_compress_job
    from capfleet.model.bundle import DECODER_FILE, ENCODER_FILE

    out = tmp_path / "out"
    cfg = CompressConfig(
        models=(str(tiny_model),),
        out=str(out),
        trials=("mixed-int8",),
        gallery=0,
        settings=TrialSettings(eval_images=8, bench_batch=8, bench_repeats=1, mixed_float_ops=2),
    )
    job = run_compress_job(cfg, log=lambda _: None)
    assert (job["ok"], job["failed"]) == (2, 0)
    rows = {r["trial"]: r for r in pq.read_table(out / "trials.parquet").to_pylist()}
    bundle = Path(rows["mixed-int8:mixed-int8"]["bundle"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantizer"] == "litert-quantizer"  # the converter quantized nothing here
    for part, file in (("encoder", ENCODER_FILE), ("decoder", DECODER_FILE)):
        layers = manifest["layers"][part]
        shipped = precisions((bundle / file).read_bytes())  # read back from the flatbuffer
        assert layers["ops"] == shipped
        assert layers["quantizer"] == "litert-quantizer" and len(layers["kept"]) == 2
        assert layers["fallback"] == "float32"
        by_node = {p["node"]: p["precision"] for p in shipped}
        assert all(by_node[n] == "float32" for n in layers["kept"])
        weighted = [p for p in shipped if p["op"] in ("CONV_2D", "FULLY_CONNECTED")]
        kept = set(layers["kept"])
        assert all(p["precision"] == "int8" for p in weighted if p["node"] not in kept)
    assert rows["mixed-int8:mixed-int8"]["test_images"] == 8  # it captioned like any other
    sens = pq.read_table(out / "sensitivity.parquet").to_pylist()
    assert {r["part"] for r in sens} == {"encoder", "decoder"}
    for part in ("encoder", "decoder"):
        ranked = sorted((r for r in sens if r["part"] == part), key=lambda r: r["rank"])
        assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
        assert {r["node"] for r in ranked if r["kept"]} == set(manifest["layers"][part]["kept"])
        assert {r["kept_as"] for r in ranked if r["kept"]} == {"float32"}
        # the worst ops' effect on the whole model, measured on dev; the others' not
        measured = [r for r in ranked if r["dev_bleu4_delta"] is not None]
        assert [r["rank"] for r in measured] == [1, 2, 3]
        assert all(r["dev_cider_d_delta"] is not None for r in measured)
    report = (out / "report.md").read_text()
    assert "## Layer sensitivity" in report and "sensitivity.png" in report
    assert (out / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"

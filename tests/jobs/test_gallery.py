"""The caption gallery: deterministic sampling, grouping caption rows, a self-contained page,
and the page rendered by a real headless Chromium (DOM and screenshot)."""

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from capfleet.core.errors import CapfleetError
from capfleet.jobs.gallery import (
    MAX_GALLERY_IMAGES,
    gallery_items,
    render_gallery,
    sample_ids,
    thumbnail,
    write_gallery,
)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _photos():
    from skimage import data

    return {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee()}


def _rows(tmp_path):
    """Caption rows of three models for three real photos (one as a file, two as bytes in
    `images`), one model failing on one image, one image where every model agrees."""
    photos = _photos()
    path = tmp_path / "chelsea.jpg"
    Image.fromarray(photos["chelsea"]).save(path, "JPEG")
    caps = {
        "astronaut": ("a woman in an orange suit", "a man in a red suit", "a woman in a suit"),
        "chelsea": ("a cat on a table", "a cat on a table", "a cat on a table"),
        "coffee": ("a cup of coffee", "a cup of <b>tea</b> & milk", None),
    }
    base = {"astronaut": 1.0, "chelsea": 0.5, "coffee": 1.5}
    rows = []
    for image_id, per_model in caps.items():
        for i, (model, cap) in enumerate(zip(("fp32", "int8", "qat-int8"), per_model, strict=True)):
            rows.append(
                {
                    "image_id": image_id,
                    "uri": str(path) if image_id == "chelsea" else None,
                    "model": model,
                    "caption": cap,
                    "status": "ok" if cap else "error",
                    "error": None if cap else "truncated: image file is truncated",
                    "cider_d": base[image_id] - 0.25 * i if cap else None,
                    "rouge_l": 0.5 if cap else None,
                    "latency_ms": 3.0,  # columns the gallery does not show are ignored
                }
            )
    refs = {k: [f"reference {n} of {k}" for n in range(2)] for k in caps}
    images = {k: _png(v) for k, v in photos.items() if k != "chelsea"}
    return rows, refs, images


def test_sample_ids_are_deterministic_and_stable():
    ids = [f"img{i:05d}.jpg" for i in range(5000)]
    a = sample_ids(ids, 50)
    assert len(a) == 50 and a == sorted(a) and len(set(a)) == 50
    assert sample_ids(reversed(ids), 50) == a  # any order
    assert sample_ids(ids + ids[:100], 50) == a  # duplicates count once
    grown = sample_ids(ids + [f"new{i}" for i in range(500)], 50)
    assert len(set(a) & set(grown)) >= 40  # adding images keeps most of the sample
    assert sample_ids(ids[:10], 50) == sorted(ids[:10])
    assert sample_ids(ids, 0) == []
    for bad in (-1, MAX_GALLERY_IMAGES + 1, 2.5):
        with pytest.raises(CapfleetError, match="gallery"):
            sample_ids(ids, bad)


def test_gallery_items_group_rows_by_image(tmp_path):
    rows, refs, images = _rows(tmp_path)
    items = gallery_items(rows, refs, images)
    assert [it["image_id"] for it in items] == ["astronaut", "chelsea", "coffee"]
    coffee = items[2]
    assert set(coffee["captions"]) == {"fp32", "int8", "qat-int8"}
    assert coffee["captions"]["qat-int8"]["status"] == "error"
    assert coffee["captions"]["fp32"]["scores"] == {"cider_d": 1.5, "rouge_l": 0.5}
    assert items[1]["image"].endswith("chelsea.jpg") and isinstance(items[0]["image"], bytes)
    assert coffee["references"] == refs["coffee"]
    with pytest.raises(CapfleetError, match="two caption rows"):
        gallery_items(rows + rows[:1])
    with pytest.raises(CapfleetError, match="without 'model'"):
        gallery_items([{"image_id": "x"}])


def test_thumbnail_is_a_small_jpeg_or_a_reason(tmp_path):
    uri, why = thumbnail(_png(_photos()["astronaut"]))
    assert why == "" and uri.startswith("data:image/jpeg;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert img.format == "JPEG" and max(img.size) == 160 and img.size[0] == img.size[1]
    assert thumbnail(b"not an image")[0] is None
    none, why = thumbnail(str(tmp_path / "missing.jpg"))
    assert none is None and why.startswith("missing")
    assert thumbnail(None) == (None, "no image")


def test_page_is_self_contained_and_escaped(tmp_path):
    rows, refs, images = _rows(tmp_path)
    page = render_gallery(gallery_items(rows, refs, images), title="t <1>")
    assert "<title>t &lt;1&gt;</title>" in page
    assert "a cup of &lt;b&gt;tea&lt;/b&gt; &amp; milk" in page  # captions are text, not HTML
    assert not re.search(r"(src|href)=\"(?!data:)", page)  # every source is inline
    assert "http://" not in page and "https://" not in page and "<link" not in page
    assert page.count("data:image/jpeg;base64,") == 3
    assert page.count('data-disagree="1"') == 2  # chelsea: all three wrote the same caption
    with pytest.raises(CapfleetError, match="at most"):
        render_gallery(
            [{"image_id": str(i), "captions": {}} for i in range(MAX_GALLERY_IMAGES + 1)]
        )
    with pytest.raises(CapfleetError, match="named twice"):
        render_gallery([], models=["a", "a"])


def _chromium(tmp_path, url: str, *args: str) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run does it)")
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # tests run as root, where Chromium's sandbox refuses to start
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_gallery_in_headless_chromium(tmp_path):
    rows, refs, images = _rows(tmp_path)
    page = write_gallery(tmp_path / "gallery.html", gallery_items(rows, refs, images), title="g")
    url = page.resolve().as_uri()

    dom = _chromium(tmp_path, url, "--dump-dom").stdout
    row = re.search(r'<tr class="item" data-id="astronaut".*?</tr>', dom, re.S).group(0)
    for caption in ("a woman in an orange suit", "a man in a red suit", "a woman in a suit"):
        assert f'<div class="caption">{caption}</div>' in row
    assert "reference 1 of astronaut" in row and "CIDEr-D 0.750" in row
    assert "3 of 3 images shown" in dom  # the script ran

    # the filter and the sort, set through the address's fragment as a link would
    dom = _chromium(tmp_path, url + "#disagree=1&sort=cider_d.1&order=desc", "--dump-dom").stdout
    order = re.findall(r'<tr class="item" data-id="(\w+)"[^>]*?(hidden="")?>', dom)
    assert [(i, bool(h)) for i, h in order][:2] == [("coffee", False), ("astronaut", False)]
    assert ("chelsea", True) in [(i, bool(h)) for i, h in order]  # all agree: filtered out
    assert "2 of 3 images shown" in dom

    shot = tmp_path / "shot.png"
    _chromium(tmp_path, url, "--window-size=1200,800", f"--screenshot={shot}")
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (800, 1200, 3)
    colours = np.unique(img.reshape(-1, 3), axis=0)
    assert len(colours) > 1000  # photos, text and table, not a blank page
    # the thumbnails were drawn: orange of the astronaut's suit somewhere in the image column
    left = img[:, :220].astype(int)
    assert ((left[..., 0] > 180) & (left[..., 1] < 120) & (left[..., 2] < 80)).sum() > 200

"""Report plots: real PNG files of a sane size, drawn headless."""

import numpy as np
import pytest
from PIL import Image

from capfleet.core.errors import CapfleetError
from capfleet.jobs.plots import plot_latency


def _check_png(path, min_w=600, min_h=250):
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    img = np.asarray(Image.open(path).convert("RGB"))
    h, w, _ = img.shape
    assert min_w <= w <= 3000 and min_h <= h <= 3000
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20  # drawn, not a blank canvas
    return img


def test_latency_plot_of_each_model(tmp_path):
    rng = np.random.default_rng(0)
    lat = {"fp32": rng.gamma(4, 0.5, 3000), "int8": list(rng.gamma(4, 0.3, 40)), "one": [2.0]}
    path = plot_latency(lat, tmp_path / "plots" / "latency.png", title="caption job")
    img = _check_png(path)
    # each model's colour is drawn (tab10 blue, red, green), so all three made it in
    for rgb in ((31, 119, 180), (214, 39, 40), (44, 160, 44)):
        assert (np.abs(img.astype(int) - rgb).sum(axis=2) < 30).sum() > 50, rgb


def test_latency_plot_refuses_what_it_cannot_draw(tmp_path):
    for bad, message in (
        ({}, "no models"),
        ({"a": []}, "no finite latency"),
        ({"a": [float("nan")]}, "no finite latency"),
        ({"a": [1.0, -2.0]}, "negative"),
    ):
        with pytest.raises(CapfleetError, match=message):
            plot_latency(bad, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()

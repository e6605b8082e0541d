import pytest

from capfleet.jobs.specs import load_spec
from capfleet.model.errors import CapfleetError
from capfleet.model.train_config import TrainConfig


def write(tmp_path, text):
    p = tmp_path / "spec.toml"
    p.write_text(text)
    return p


def test_train_spec_loads_into_frozen_config(tmp_path):
    cfg = load_spec(write(tmp_path, 'kind = "train"\n[train]\ndata = "d"\nout = "o"\nepochs = 3\n'))
    assert cfg == TrainConfig(data="d", out="o", epochs=3)
    with pytest.raises(AttributeError):
        cfg.epochs = 4


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[train]\ndata = "d"\nout = "o"\n', "kind must be one of train"),
        ('kind = "train"\n', r"missing the \[train\] table"),
        (
            'kind = "train"\n[train]\ndata = "d"\nout = "o"\nepoch = 3\n',
            "unknown key 'epoch'; allowed: data, out, encoder",
        ),
        (
            'kind = "train"\n[train]\ndata = "d"\nout = "o"\nepochs = "3"\n',
            "epochs must be int, got '3'",
        ),
        ('kind = "train"\n[train]\ndata = "d"\nout = "o"\nepochs = true\n', "epochs must be int"),
        ('kind = "train"\n[train]\nout = "o"\n', "missing required key 'data'"),
        (
            'kind = "train"\n[train]\ndata = "d"\nout = "o"\nencoder = "vit"\n',
            "encoder: 'vit' is not one of mobilenet_v2, resnet50, small_cnn, vgg16",
        ),
        (
            'kind = "train"\n[train]\ndata = "d"\nout = "o"\ndropout = 1.5\n',
            r"dropout: must be in \[0, 1\)",
        ),
        (
            'kind = "train"\n[train]\ndata = "d"\nout = "o"\nweights = "w.h5"\n',
            "existing weights file",
        ),
        ('kind = "train"\n[train\n', "invalid TOML"),
    ],
)
def test_bad_specs_are_refused_naming_file_and_key(tmp_path, body, message):
    p = write(tmp_path, body)
    with pytest.raises(CapfleetError, match=message) as e:
        load_spec(p)
    assert str(p) in str(e.value)


def test_float_fields_accept_integers(tmp_path):
    body = (
        'kind = "train"\n[train]\ndata = "d"\nout = "o"\nlearning_rate = 0.01\ntime_budget_s = 60\n'
    )
    assert load_spec(write(tmp_path, body)).time_budget_s == 60


def test_every_example_spec_loads():
    from pathlib import Path

    examples = sorted((Path(__file__).resolve().parents[2] / "jobs" / "examples").glob("*.toml"))
    assert examples
    for p in examples:
        load_spec(p)


def test_grid_expands_to_named_validated_variants(tmp_path):
    body = (
        'kind = "train"\n[train]\ndata = "d"\nout = "o"\nepochs = 3\n'
        "[grid]\nlearning_rate = [0.001, 0.003]\nunits = [64]\n"
    )
    grid = load_spec(write(tmp_path, body))
    assert grid.names == ("learning_rate=0.001", "learning_rate=0.003")
    assert [v.out for v in grid.variants] == ["o/learning_rate=0.001", "o/learning_rate=0.003"]
    assert {v.units for v in grid.variants} == {64}


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ('data = ["a", "b"]', "'data' cannot vary"),
        ("units = 3", "units must be a non-empty list"),
        ('units = [8, "x"]', "variant units=x.*units must be int"),
        ("dropout = [0.1, 1.5]", "dropout: must be in"),
    ],
)
def test_bad_grids_are_refused(tmp_path, grid, message):
    body = f'kind = "train"\n[train]\ndata = "d"\nout = "o"\n[grid]\n{grid}\n'
    with pytest.raises(CapfleetError, match=message):
        load_spec(write(tmp_path, body))


def test_compress_spec_with_nested_settings(tmp_path):
    body = (
        'kind = "compress"\n[compress]\nmodels = ["m"]\nout = "c"\ntrials = ["int8"]\n'
        "[compress.settings]\nfinetune_epochs = 2\nshrink_epochs = 5\n"
        "shrink_learning_rate = 0.001\n"
    )
    cfg = load_spec(write(tmp_path, body))
    assert cfg.models == ("m",) and cfg.settings.finetune_epochs == 2
    assert cfg.settings.shrink_epochs == 5 and cfg.settings.shrink_learning_rate == 0.001
    assert cfg.settings.finetune_learning_rate == 5e-4  # pruning and QAT keep their own
    with pytest.raises(CapfleetError, match=r"shrink_learning_rate: must be in \(0, 1\), got 0"):
        load_spec(write(tmp_path, body.replace("= 0.001", "= 0")))
    with pytest.raises(CapfleetError, match="shrink_epochs: must be >= 1, got 0"):
        load_spec(write(tmp_path, body.replace("shrink_epochs = 5", "shrink_epochs = 0")))
    bad = body.replace("finetune_epochs = 2", "finetune_epoch = 2")
    with pytest.raises(CapfleetError, match=r"\[compress\].settings: unknown key 'finetune_epoch'"):
        load_spec(write(tmp_path, bad))
    with pytest.raises(CapfleetError, match="trials must be a list of strings"):
        load_spec(write(tmp_path, body.replace('["int8"]', '"int8"')))


def test_compress_spec_gallery(tmp_path):
    body = 'kind = "compress"\n[compress]\nmodels = ["m"]\nout = "c"\ngallery = 50\n'
    assert load_spec(write(tmp_path, body)).gallery == 50
    assert load_spec(write(tmp_path, body.replace("gallery = 50\n", ""))).gallery == 200
    with pytest.raises(CapfleetError, match="gallery: must be 0"):
        load_spec(write(tmp_path, body.replace("= 50", "= 5000")))
    with pytest.raises(CapfleetError, match="gallery"):
        load_spec(write(tmp_path, body.replace("= 50", '= "all"')))

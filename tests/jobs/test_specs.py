import pytest

from capfleet.core.errors import CapfleetError
from capfleet.jobs.specs import load_spec
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


FLOATS = {
    "train": ["dropout", "learning_rate", "label_smoothing", "time_budget_s"],
    "caption": ["actor_cpus", "decode_cpus", "max_image_mb", "shard_timeout_s"],
    "compress": ["cpus_per_trial"],
}
BASE = {
    "train": 'data = "d"\nout = "o"\n',
    "caption": 'bundles = ["b"]\ninput = "i"\nout = "o"\n',
    "compress": 'models = ["m"]\nout = "o"\n',
}


@pytest.mark.parametrize(
    ("kind", "key"), [(k, f) for k, fs in FLOATS.items() for f in fs] + [("compress", "settings")]
)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_infinity_are_refused_for_every_float(tmp_path, kind, key, value):
    body = f'kind = "{kind}"\n[{kind}]\n{BASE[kind]}'
    if key == "settings":  # a nested table's floats too
        body += f"[{kind}.settings]\nfinetune_learning_rate = {value}\n"
        key = "finetune_learning_rate"
    else:
        body += f"{key} = {value}\n"
    with pytest.raises(CapfleetError, match=rf"{key}: must be a finite number, got {value}"):
        load_spec(write(tmp_path, body))


@pytest.mark.parametrize(
    ("kind", "line", "message"),
    [
        ("train", "seed = 2147483648", "seed: must be <= 2147483647"),
        ("train", "seed = -1", "seed: must be >= 0"),
        ("train", "threads = 5000", "threads: must be <= 1024"),
        ("train", "beam_width = 1000", "beam_width: must be <= 64"),
        ("caption", "actors = 10000000", "actors: must be <= 100000"),
        ("caption", "shard_size = 100000000", "shard_size: must be <= 1000000"),
        ("caption", "batch_size = 1000000", "batch_size: must be <= 65536"),
        ("compress", "max_retries = 1000", "max_retries: must be <= 100"),
    ],
)
def test_values_beyond_sense_are_refused(tmp_path, kind, line, message):
    body = f'kind = "{kind}"\n[{kind}]\n{BASE[kind]}{line}\n'
    with pytest.raises(CapfleetError, match=message):
        load_spec(write(tmp_path, body))


def test_folder_names_from_specs_stay_inside_their_output(tmp_path):
    body = 'kind = "compress"\n[compress]\nmodels = [".."]\nout = "o"\n'
    with pytest.raises(CapfleetError, match="names no model folder"):
        load_spec(write(tmp_path, body))
    (tmp_path / "w.h5").write_bytes(b"x")
    body = (
        'kind = "train"\n[train]\ndata = "d"\nout = "o"\nencoder = "small_cnn"\n'
        f'[grid]\nweights = ["none", "{tmp_path}/../{tmp_path.name}/w.h5"]\n'
    )
    grid = load_spec(write(tmp_path, body))
    for name, v in zip(grid.names, grid.variants, strict=True):
        assert "/" not in name and ".." not in name and name not in (".", "")
        assert v.out == f"o/{name}"


def test_a_bad_spec_is_one_line_and_exit_2(tmp_path, capsys):
    from capfleet.jobs.cli import main

    spec = write(tmp_path, 'kind = "train"\n[train]\ndata = "d"\nout = "o"\ntime_budget_s = nan\n')
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(spec) in err[0] and "time_budget_s" in err[0]


def test_unreadable_markers_and_records_mean_do_it_again(tmp_path):
    from capfleet.jobs.compress.trials import _read_record
    from capfleet.jobs.pipeline import _read_marker

    lines: list = []
    (tmp_path / "m.json").write_text("{not json")
    assert _read_marker(tmp_path / "m.json", lines.append) is None
    (tmp_path / "r.json").write_bytes(b"\x00\x01")
    assert _read_record(tmp_path / "r.json", lines.append) is None
    assert len(lines) == 2 and "generated again" in lines[0] and "run again" in lines[1]


def test_compress_goal_specs(tmp_path):
    body = (
        'kind = "compress"\n[compress]\nmodels = ["m"]\nout = "c"\n'
        '[compress.goal]\nmax_delta_bleu4 = 0.01\nminimize = "size"\nmax_ms = 2\n'
    )
    cfg = load_spec(write(tmp_path, body))
    assert cfg.goal.max_delta_bleu4 == 0.01 and cfg.goal.minimize == "size"
    assert cfg.goal.max_ms == 2 and cfg.goal.max_size_mb is None
    with pytest.raises(CapfleetError, match="chooses its own trials"):
        load_spec(write(tmp_path, body.replace('out = "c"\n', 'out = "c"\ntrials = ["int8"]\n')))
    with pytest.raises(CapfleetError, match=r"\[compress\].goal: unknown key 'max_delta'"):
        load_spec(write(tmp_path, body.replace("max_delta_bleu4", "max_delta")))
    with pytest.raises(CapfleetError, match="goal search chooses a bundle of one model"):
        load_spec(write(tmp_path, body.replace('["m"]', '["m", "n"]')))
    with pytest.raises(CapfleetError, match="minimize: must be one of latency, size"):
        load_spec(write(tmp_path, body.replace('"size"', '"speed"')))
    pipeline = 'kind = "pipeline"\n[pipeline]\nout = "p"\n[pipeline.compress.goal]\nmax_ms = 1\n'
    with pytest.raises(CapfleetError, match="a goal search runs as its own compress spec"):
        load_spec(write(tmp_path, pipeline))

"""A large graph is converted in a process of its own: same flatbuffer behaviour, clear errors."""

from pathlib import Path

import numpy as np
import pytest

from capfleet.compression import convert
from capfleet.core.errors import CapfleetError


@pytest.fixture(scope="module")
def encoder():
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(5, name="proj")(x), name="tiny_encoder")


def _run(flatbuffer: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_content=flatbuffer).get_signature_runner()
    return runner(image=x)["img_proj"]


@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_a_graph_converted_apart_runs_as_one_converted_in_process(encoder, mode, monkeypatch):
    x = np.random.default_rng(1).normal(size=(6, 16, 16, 3)).astype(np.float32)

    def samples():
        for i in range(len(x)):
            yield {"image": x[i : i + 1]}

    here = convert.encoder_to_tflite(encoder, mode, samples)
    monkeypatch.setattr(convert, "APART_BYTES", 0)  # every graph apart
    calls = []
    real = convert._apart
    monkeypatch.setattr(convert, "_apart", lambda *a: calls.append(a[2]) or real(*a))
    apart = convert.encoder_to_tflite(encoder, mode, samples)
    assert calls == [mode]
    np.testing.assert_array_equal(_run(apart, x), _run(here, x))
    if mode == "fp32":
        np.testing.assert_allclose(_run(apart, x), encoder.predict_on_batch(x), atol=1e-5)


def test_a_conversion_apart_goes_on_while_the_caller_works_and_ends_when_it_fails(
    encoder, monkeypatch
):
    import subprocess

    monkeypatch.setattr(convert, "APART_BYTES", 0)
    children, real = [], subprocess.Popen
    monkeypatch.setattr(
        convert.subprocess, "Popen", lambda *a, **k: children.append(real(*a, **k)) or children[-1]
    )
    x = np.random.default_rng(2).normal(size=(3, 16, 16, 3)).astype(np.float32)
    with convert.encoder_conversion(encoder, "fp32") as flatbuffer:
        assert children[0].poll() is None  # converting (TensorFlow alone takes seconds to start)
        out = _run(flatbuffer(), x)
    np.testing.assert_allclose(out, encoder.predict_on_batch(x), atol=1e-5)

    with pytest.raises(RuntimeError, match="the caller's own work failed"):
        with convert.encoder_conversion(encoder, "fp32"):
            raise RuntimeError("the caller's own work failed")
    child = children[1]
    assert child.poll() is not None  # ended, not left converting for nobody
    assert not Path(child.args[3]).exists()  # its folder removed


def test_a_failed_conversion_apart_names_the_graph_and_the_cause(encoder, monkeypatch):
    monkeypatch.setattr(convert, "APART_BYTES", 0)

    def wrong_inputs():  # the calibration samples name an input the graph does not have
        yield {"pixels": np.zeros((1, 16, 16, 3), np.float32)}

    with pytest.raises(CapfleetError, match=r"tiny_encoder: TFLite conversion \(int8\) failed"):
        convert.encoder_to_tflite(encoder, "int8", wrong_inputs)


def _state(pid: int) -> str | None:
    """A process's state letter (Z: ended, not yet reaped), None when it is gone."""
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="Linux only")
def test_the_converter_process_ends_when_its_caller_is_killed(tmp_path):
    """A trial's worker killed mid-conversion must not leave its converter running: here the
    converter blocks on reading its samples (a FIFO no one writes) until its caller dies."""
    import os
    import signal
    import subprocess
    import sys
    import time

    os.mkfifo(tmp_path / "sample-image.npy")
    caller = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-m', 'capfleet.compression.convert',"
            f" {str(tmp_path)!r}, 'int8', 'x', str(os.getpid())])\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(caller.stdout.readline())
    try:
        time.sleep(1.0)
        assert _state(child) not in (None, "Z")  # converting (blocked on its samples)
        caller.send_signal(signal.SIGKILL)
        caller.wait()
        deadline = time.monotonic() + 30
        while _state(child) not in (None, "Z") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _state(child) in (None, "Z")
    finally:
        if _state(child) not in (None, "Z"):
            os.kill(child, signal.SIGKILL)
        caller.kill()

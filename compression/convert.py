"""Keras graphs -> TFLite flatbuffers with named signatures, a dynamic batch, and a quantization
mode. Quantization is done by TensorFlow's TFLite converter (recorded in bundle manifests as
`tflite-converter`):

    fp32     no quantization
    dynamic  dynamic-range: int8 weights, float activations
    float16  float16 weights (smaller; no faster on CPU, docs/stack.md)
    int8     full integer: int8 weights and activations, calibrated on `representative` samples
             (dicts keyed by the signature's input names), float inputs and outputs
    qat-int8 a quantization-aware-trained graph, converted to full integer like int8: the trained
             ranges where the graph has them (its Dense layers), calibrated ranges elsewhere
             (the LSTM cell, whose weights would otherwise stay float: 3x the size)

A graph with more than APART_BYTES of weights (VGG16's encoder: 538 MB) is converted in a
process of its own, from a SavedModel of the graph and its representative samples saved to a
temporary folder: the converter's peak memory then ends with that process instead of staying
with the caller (a Ray worker that runs trial after trial), and that process holds no Keras
model (bench/README.md has the measured peaks). On Linux the child is killed when its caller
ends, so a worker killed mid-conversion leaves no converter behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from capfleet.core.errors import CapfleetError

MODES = ("fp32", "dynamic", "float16", "int8", "qat-int8")
QUANTIZER = "tflite-converter"
APART_BYTES = 256 * 2**20  # weights above which a graph is converted in a process of its own

Representative = Callable[[], Iterable[dict]]


def encoder_to_tflite(
    encoder,
    mode: str = "fp32",
    representative: Representative | None = None,
    output: str = "img_proj",
    apart: bool | None = None,
) -> bytes:
    """Encoder graph (images -> img_proj) -> TFLite with signature input {image} and output
    {`output`} (a bare backbone's is "features"). `apart`: convert in a process of its own
    (None: when the graph has more than APART_BYTES of weights)."""
    with encoder_conversion(encoder, mode, representative, output, apart) as flatbuffer:
        return flatbuffer()


@contextmanager
def encoder_conversion(
    encoder,
    mode: str = "fp32",
    representative: Representative | None = None,
    output: str = "img_proj",
    apart: bool | None = None,
) -> Iterator[Callable[[], bytes]]:
    """`encoder_to_tflite` begun, for the caller to work on while it runs: yields a function
    that waits for the flatbuffer. A graph converted apart goes on in its own process (the
    converter runs on one thread, so a caller holding more CPUs has them free meanwhile); one
    converted in this process is done before the yield. Leaving the block ends a conversion
    still running and removes its folder: call the function inside the block."""
    import tensorflow as tf

    spec = tf.TensorSpec([None, *encoder.input_shape[1:]], tf.float32, name="image")

    @tf.function(input_signature=[spec])
    def serve(image):
        return {output: encoder(image, training=False)}

    with _conversion(serve, encoder, mode, representative, apart) as flatbuffer:
        yield flatbuffer


def step_to_tflite(
    step, units: int, mode: str = "fp32", representative: Representative | None = None
) -> bytes:
    """Decoder step graph -> TFLite, inputs {token, h, c, img_proj}, outputs {logits, h, c}."""
    return _convert(step_function(step, units), step, mode, representative)


def step_function(step, units: int):
    """The step graph as the tf.function that bundles sign: a dynamic batch, named inputs."""
    import tensorflow as tf

    specs = [
        tf.TensorSpec([None], tf.int32, name="token"),
        tf.TensorSpec([None, units], tf.float32, name="h"),
        tf.TensorSpec([None, units], tf.float32, name="c"),
        tf.TensorSpec([None, units], tf.float32, name="img_proj"),
    ]

    @tf.function(input_signature=specs)
    def serve(token, h, c, img_proj):
        logits, h2, c2 = step([token, h, c, img_proj], training=False)
        return {"logits": logits, "h": h2, "c": c2}

    return serve


def _convert(
    fn, keras_model, mode: str, representative: Representative | None, apart: bool | None = None
) -> bytes:
    with _conversion(fn, keras_model, mode, representative, apart) as flatbuffer:
        return flatbuffer()


@contextmanager
def _conversion(
    fn, keras_model, mode: str, representative: Representative | None, apart: bool | None
) -> Iterator[Callable[[], bytes]]:
    import tensorflow as tf

    if mode not in MODES:
        raise CapfleetError(f"unknown conversion mode {mode!r}; allowed: {', '.join(MODES)}")
    if mode in ("int8", "qat-int8") and representative is None:
        raise CapfleetError(f"{mode} conversion needs representative samples to calibrate on")
    if apart is None:
        weights = sum(int(np.prod(w.shape)) * w.dtype.size for w in keras_model.weights)
        apart = weights > APART_BYTES
    if apart:
        with _apart(fn, keras_model, mode, representative) as flatbuffer:
            yield flatbuffer
        return
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [fn.get_concrete_function()], keras_model
    )
    flat = _run(converter, keras_model.name, mode, representative)
    yield lambda: flat


def _run(converter, name: str, mode: str, representative: Representative | None) -> bytes:
    import tensorflow as tf

    if mode != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if mode in ("int8", "qat-int8"):
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    try:
        return converter.convert()
    except Exception as e:  # noqa: BLE001  the converter raises ConverterError and friends
        raise CapfleetError(f"{name}: TFLite conversion ({mode}) failed: {e}") from e


@contextmanager
def _apart(fn, keras_model, mode: str, representative: Representative | None):
    """`_conversion` in a child process: the graph saved as a SavedModel (its signature `fn`),
    the representative samples as one .npy per input (samples stacked), the flatbuffer read
    back by the function yielded. The child's messages go to a file, not a pipe: a pipe
    nobody reads while the caller works on would stall the child once full."""
    import tensorflow as tf

    name = keras_model.name
    with tempfile.TemporaryDirectory(prefix="capfleet-convert-") as tmp:
        work = Path(tmp)
        holder = tf.Module()
        holder.weights = list(keras_model.weights)  # what the signature's graph reads
        tf.saved_model.save(
            holder, str(work / "graph"), signatures={"serving_default": fn.get_concrete_function()}
        )
        samples = list(representative()) if representative is not None else []
        for key in samples[0] if samples else ():
            np.save(work / f"sample-{key}.npy", np.stack([s[key] for s in samples]))
        del samples
        with open(work / "stderr.txt", "w") as stderr:
            proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "capfleet.compression.convert"),
                    *(str(work), mode, name, str(os.getpid())),
                ],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

        def flatbuffer() -> bytes:
            error, rc = work / "error.txt", proc.wait()
            if rc != 0:
                if error.exists():
                    raise CapfleetError(error.read_text())
                how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
                said = (work / "stderr.txt").read_text(errors="replace")[-2000:].strip()
                raise CapfleetError(
                    f"{name}: TFLite conversion ({mode}) failed: its process ended ({how}): {said}"
                )
            return (work / "model.tflite").read_bytes()

        try:
            yield flatbuffer
        finally:
            if proc.poll() is None:  # the caller failed or left early: end the conversion
                proc.kill()
                proc.wait()


def _die_with(parent: int) -> None:
    """End this process when `parent` ends (Linux): a trial's worker killed mid-conversion
    (Ctrl-C, Ray's memory monitor) must not leave its converter holding gigabytes."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it ended before the line above ran
        sys.exit(1)


def _child(work: Path, mode: str, name: str) -> int:
    """The child process of `_apart`: SavedModel in `work` -> work/model.tflite."""
    import tensorflow as tf

    samples = {p.stem.removeprefix("sample-"): np.load(p) for p in work.glob("sample-*.npy")}

    def representative():
        for i in range(len(next(iter(samples.values())))):
            yield {key: rows[i] for key, rows in samples.items()}

    converter = tf.lite.TFLiteConverter.from_saved_model(str(work / "graph"))
    try:
        flat = _run(converter, name, mode, representative if samples else None)
    except CapfleetError as e:
        (work / "error.txt").write_text(str(e))
        return 1
    (work / "model.tflite").write_bytes(flat)
    return 0


if __name__ == "__main__":
    _die_with(int(sys.argv[4]))
    sys.exit(_child(Path(sys.argv[1]), sys.argv[2], sys.argv[3]))

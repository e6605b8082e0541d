"""Per-layer post-training quantization of a part's float flatbuffer with the LiteRT quantizer
(`litert-quantizer`, formerly ai-edge-quantizer): layer sensitivity and mixed precision.

    ops              the part's ops as the quantizer names them (kind, scope, Keras layer)
    quantize_int8    static int8 (int8 weights per channel, int8 activations calibrated on the
                     samples; inputs and outputs stay float), chosen ops kept float or in
                     int16x8 (int16 activations, int8 weights)
    sensitivity      each op quantized to int8 alone, every other op float: the part's outputs
                     against float on the samples (SNR in dB, cosine), ranked worst first
    mixed_int8       int8 but for the K ops sensitivity ranks worst, kept in the fallback
                     precision (float32, or int16x8: smaller, and integer throughout)
    precisions       each op's precision, read back from a flatbuffer

Calibration runs once per part, over every sample, keeping each tensor's minimum and maximum
(the TFLite converter's int8 does the same; the quantizer's default, a moving average of each
sample's, narrows the ranges): the ranges serve every recipe built on that part. The error
figures are measured on at most EVAL_SAMPLES of the samples, in one batch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from capfleet.core.errors import CapfleetError

QUANTIZER = "litert-quantizer"
SIGNATURE = "serving_default"
EVAL_SAMPLES = 256
FALLBACKS = ("float32", "int16x8")  # what a mixed part's kept ops run in
_OUTPUT = re.compile(r"^StatefulPartitionedCall(?:_\d+)?:(\d+)$")


@dataclass(frozen=True)
class Op:
    """One op of a flatbuffer's main graph that the quantizer can quantize."""

    index: int
    kind: str  # TFLite's op name, e.g. CONV_2D
    scope: str  # the quantizer's name for it: its output tensors' names, each with a ';'
    layer: str  # the Keras layer it comes from, e.g. small_cnn/conv1 (output-N: an output's)
    node: str  # the op's own name in it, e.g. small_cnn/conv1/Conv2D1


def ops(flat: bytes) -> list[Op]:
    """The ops of `flat`'s main graph the quantizer knows, in graph order."""
    from litert_quantizer.utils import tfl_flatbuffer_utils as tfu

    model = tfu.read_model(bytearray(flat))
    graph = model.subgraphs[0]
    found = []
    for i, op in enumerate(graph.operators):
        kind = tfu.TFL_OP_CODE_TO_NAME.get(model.operatorCodes[op.opcodeIndex].builtinCode)
        if kind is None:
            continue  # an op it does not know stays float in every recipe
        scope = tfu.get_op_scope(op, graph.tensors)
        found.append(Op(i, str(kind.value), scope, _layer(scope), _node(scope)))
    return found


def _node(scope: str) -> str:
    """An op's name from its last output name, less the graph's: "encoder/small_cnn/conv1/
    Conv2D1" -> "small_cnn/conv1/Conv2D1"; a graph output's ("StatefulPartitionedCall:2") ->
    "output-2"."""
    name = ([n for n in scope.split(";") if n] or ["?"])[-1]
    out = _OUTPUT.match(name)
    if out:
        return f"output-{out.group(1)}"
    return "/".join(name.split("/")[1:]) or name


def _layer(scope: str) -> str:
    """The Keras layer of an op: its name less the op's own ("small_cnn/conv1")."""
    node = _node(scope)
    return node if node.startswith("output-") else (node.rpartition("/")[0] or node)


class PartQuantizer:
    """One part's float flatbuffer, calibrated once on representative `samples` (dicts of
    arrays keyed by the signature's inputs, as the converter takes them), quantized by recipe."""

    def __init__(self, flat: bytes, samples: Iterable[dict]):
        from litert_quantizer import calibrator
        from litert_quantizer.utils import qsv_utils

        self.flat = bytes(flat)
        rows = list(samples)
        if not rows:
            raise CapfleetError("mixed precision needs representative samples to calibrate on")
        self.ops = ops(self.flat)
        calib = calibrator.Calibrator(self.flat, qsv_update_func=qsv_utils.min_max_update)
        # the recipe tells the calibrator which tensors to record: every one int8 touches
        calib.calibrate({SIGNATURE: rows}, self._quantizer(())._recipe_manager)
        self._ranges = calib.get_model_qsvs()
        picked = rows[:: max(1, len(rows) // EVAL_SAMPLES)][:EVAL_SAMPLES]
        self.samples = {k: np.concatenate([r[k] for r in picked]) for k in rows[0]}
        self._float = run(self.flat, self.samples)

    def _quantizer(self, keep: Iterable[str], only: str | None = None, fallback: str = "float32"):
        from litert_quantizer import qtyping, quantizer

        name, algo = qtyping.TFLOperationName, quantizer.AlgorithmName
        qt = quantizer.Quantizer(self.flat)
        which = ".*" if only is None else f"^{re.escape(only)}$"
        qt.add_static_config(which, name.ALL_SUPPORTED, activation_num_bits=8, weight_num_bits=8)
        for scope in keep:
            regex = f"^{re.escape(scope)}$"
            if fallback == "int16x8":
                qt.add_static_config(
                    regex, name.ALL_SUPPORTED, activation_num_bits=16, weight_num_bits=8
                )
            else:
                qt.update_quantization_recipe(
                    regex=regex, operation_name=name.ALL_SUPPORTED, algorithm_key=algo.NO_QUANTIZE
                )
        for io in (name.INPUT, name.OUTPUT):  # float in, float out, as the converter's int8
            qt.update_quantization_recipe(
                regex=".*", operation_name=io, algorithm_key=algo.NO_QUANTIZE
            )
        return qt

    def quantize_int8(
        self, keep: Sequence[str] = (), only: str | None = None, fallback: str = "float32"
    ) -> bytes:
        """Static int8 of every op but those whose scope is in `keep`, which run in `fallback`
        (with `only`: int8 of that op alone)."""
        if fallback not in FALLBACKS:
            raise CapfleetError(f"fallback precision must be one of {FALLBACKS}, got {fallback!r}")
        qt = self._quantizer(keep, only, fallback)
        try:
            result = qt.quantize(self._ranges, enable_progress_report=False)
        except Exception as e:  # noqa: BLE001  the quantizer raises ValueError and friends
            raise CapfleetError(f"{QUANTIZER}: int8 quantization failed: {e}") from e
        return bytes(result.quantized_model)

    def error(self, flat: bytes) -> dict:
        """`flat`'s outputs against the float part's on the samples: SNR (dB) and cosine."""
        return compare(self._float, run(flat, self.samples))

    def sensitivity(self) -> list[dict]:
        """Per op: the part's error when that op alone is int8, ranked worst (lowest SNR)
        first. Ops with nothing to quantize alone are left out, as are those whose graph the
        quantizer leaves unrunnable when it quantizes them alone (an op whose output is both
        a graph output and another op's input, as the LSTM's state)."""
        rows = []
        for op in self.ops:
            alone = self.quantize_int8(only=op.scope)
            if all(p["precision"] in ("float32", "conversion") for p in precisions(alone)):
                continue
            try:
                error = self.error(alone)
            except (RuntimeError, ValueError):
                continue
            rows.append(
                {"op": op.kind, "layer": op.layer, "node": op.node, "scope": op.scope, **error}
            )
        rows.sort(key=lambda r: (r["snr_db"] is None, r["snr_db"]))  # no error: last
        for rank, r in enumerate(rows, 1):
            r["rank"] = rank
        return rows

    def mixed_int8(
        self, keep: int, ranked: list[dict] | None = None, fallback: str = "float32"
    ) -> tuple[bytes, list[dict]]:
        """Int8 but for the `keep` most sensitive ops (of `ranked`, else of sensitivity()),
        kept in `fallback` precision, passing over any whose fallback the quantizer cannot
        build or leaves the graph unrunnable; returns the flatbuffer and the kept ops'
        sensitivity rows."""
        ranked = self.sensitivity() if ranked is None else ranked
        kept: list[dict] = []
        flat = self.quantize_int8()
        for row in ranked:
            if len(kept) == keep:
                break
            try:
                candidate = self.quantize_int8([r["scope"] for r in [*kept, row]], None, fallback)
                outputs = run(candidate, {k: v[:1] for k, v in self.samples.items()}, raw=True)
            except (CapfleetError, RuntimeError, ValueError):
                continue
            if any(o.dtype != np.float32 for o in outputs):
                continue  # an int16x8 graph output: the bundle's parts pass float to each other
            kept.append(row)
            flat = candidate
        return flat, kept


def run(flat: bytes, inputs: dict[str, np.ndarray], raw: bool = False) -> list[np.ndarray]:
    """A flatbuffer's signature outputs for one batch of inputs, in output-name order, as
    float64 (`raw`: as the graph gives them)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flat)
    runner = interpreter.get_signature_runner(SIGNATURE)
    out = runner(**inputs)
    return [out[k] if raw else np.asarray(out[k], dtype=np.float64) for k in sorted(out)]


def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    """SNR in dB (signal = the reference's energy; None where the outputs are equal) and cosine
    similarity of all outputs flattened together."""
    r = np.concatenate([a.ravel() for a in ref])
    g = np.concatenate([a.ravel() for a in got])
    noise = float(np.sum((g - r) ** 2))
    signal = float(np.sum(r**2))
    snr = None if noise == 0 else round(float(10 * np.log10(max(signal, 1e-30) / noise)), 3)
    norm = float(np.linalg.norm(r) * np.linalg.norm(g))
    cosine = float(r @ g / norm) if norm else float(not r.any() and not g.any())  # 0 vs x: 0
    return {"snr_db": snr, "cosine": round(cosine, 6)}


def precisions(flat: bytes) -> list[dict]:
    """Each op of `flat`'s main graph with its precision, read from the flatbuffer (without
    unpacking its weights): int8 or int16x8 where its output is integer, int8-weights where
    float computation reads int8 weights, float32 otherwise; QUANTIZE and DEQUANTIZE ops are
    conversions, listed as such."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(flat, 0)
    graph = model.Subgraphs(0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}

    def tensors(indices):
        return [graph.Tensors(i) for i in indices if i >= 0]

    def constant(tensor) -> bool:
        buffer = model.Buffers(tensor.Buffer())
        return buffer is not None and (buffer.DataLength() > 0 or buffer.Offset() > 1)

    rows = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = model.OperatorCodes(op.OpcodeIndex())
        kind = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "CUSTOM")
        outputs = tensors(op.OutputsAsNumpy()) if op.OutputsLength() else []
        inputs = tensors(op.InputsAsNumpy()) if op.InputsLength() else []
        out_type = types.get(outputs[0].Type(), "?") if outputs else "-"
        if kind in ("QUANTIZE", "DEQUANTIZE"):
            precision = "conversion"
        elif out_type == "int16":
            precision = "int16x8"
        elif out_type == "int8":
            precision = "int8"
        elif any(types.get(t.Type()) == "int8" and constant(t) for t in inputs):
            precision = "int8-weights"  # float computation on int8 weights (dynamic range)
        else:
            precision = "float32"
        name = (outputs[0].Name() or b"").decode() if outputs else ""
        rows.append({"op": kind, "node": _node(name + ";"), "precision": precision})
    return rows

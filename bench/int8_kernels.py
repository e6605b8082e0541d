"""Why the int8 VGG16 encoder is no faster than fp32 on some CPUs: two VGG16-sized 3x3
convolutions (56x56, 128 -> 256 -> 256 channels, batch 4, the shape of VGG16's third block)
converted fp32, dynamic and int8 by capfleet's own converter (`compression.convert`), each run
in LiteRT with one thread, with XNNPACK (LiteRT's default delegate, which also runs int8) and
without it (the builtin kernels). Random weights and inputs: speed does not depend on them.

XNNPACK's int8 convolutions beat fp32 only where the CPU has an int8 dot-product instruction
(AVX-512 VNNI or AVX-VNNI); with AVX2 alone they multiply at fp32's rate. The CPU's flags are
recorded beside the timings."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.common import write_result

SHAPE = (4, 56, 56, 128)
REPEATS = 5


def cpu_flags() -> list[str]:
    wanted = {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(wanted & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def run() -> None:
    import tf_keras as keras
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from capfleet.compression.convert import encoder_to_tflite
    from capfleet.compression.trial import _best_ms

    keras.utils.set_random_seed(0)
    inp = keras.Input(SHAPE[1:], name="image")
    x = keras.layers.Conv2D(256, 3, padding="same", activation="relu")(inp)
    x = keras.layers.Conv2D(256, 3, padding="same", activation="relu")(x)
    convs = keras.Model(inp, x, name="vgg16_block3_convs")
    rng = np.random.default_rng(0)
    xin = rng.random(SHAPE, dtype=np.float32)

    def representative():
        for _ in range(8):
            yield {"image": rng.random((1, *SHAPE[1:]), dtype=np.float32)}

    kernels = {
        "xnnpack": OpResolverType.AUTO,
        "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    }
    rows = []
    for mode in ("fp32", "dynamic", "int8"):
        flat = encoder_to_tflite(convs, mode, representative if mode == "int8" else None)
        for kernel, resolver in kernels.items():
            it = Interpreter(
                model_content=flat, num_threads=1, experimental_op_resolver_type=resolver
            )
            it.resize_tensor_input(it.get_input_details()[0]["index"], SHAPE)
            it.allocate_tensors()
            index = it.get_input_details()[0]["index"]

            def invoke(it=it, index=index):
                it.set_tensor(index, xin)
                it.invoke()

            invoke()  # warm up
            best = _best_ms(invoke, REPEATS)
            rows.append({"mode": mode, "kernels": kernel, "ms_per_batch": round(best, 1)})
            print(rows[-1], flush=True)
    ms = {(r["mode"], r["kernels"]): r["ms_per_batch"] for r in rows}
    write_result(
        "int8_kernels",
        {
            "what": __doc__,
            "cpu_flags": cpu_flags(),
            "batch_shape": list(SHAPE),
            "threads": 1,
            "timings": rows,
            "int8_speedup_over_fp32": round(ms["fp32", "xnnpack"] / ms["int8", "xnnpack"], 2),
        },
    )

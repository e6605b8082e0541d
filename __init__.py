"""capfleet: caption large image sets on Ray, and choose how far to compress the captioner.

The public Python API (the CLI calls the same functions):

    import capfleet
    result = capfleet.run("jobs/examples/demo.toml")          # any spec file or config
    result = capfleet.caption(capfleet.CaptionConfig(bundles=("b/int8",), input="imgs", out="o"))
    result = capfleet.compress(capfleet.CompressConfig(models=("m",), out="c"))
    result = capfleet.train(capfleet.TrainConfig(data="d", out="m"))

Errors in the user's input are `capfleet.CapfleetError`, raised before any work starts.

This file is the package's root: the repository's folders model/, compression/, cluster/ and
jobs/ are installed as capfleet.model, capfleet.compression, capfleet.cluster, capfleet.jobs.
"""

import os

# tensorflow-model-optimization works only with Keras 2 (tf_keras). This must be set before
# TensorFlow is first imported; every capfleet module is imported through this package, so
# this is the one place it is set. TF_ENV is also what Ray workers and submitted jobs get.
TF_ENV = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
for _key, _value in TF_ENV.items():
    os.environ.setdefault(_key, _value)

# The API is imported on first use, so that `import capfleet.model.bundle` in a caption worker
# stays light (no TensorFlow, no Ray).
_API = {
    "caption": "capfleet.jobs.api",
    "compress": "capfleet.jobs.api",
    "train": "capfleet.jobs.api",
    "run": "capfleet.jobs.api",
    "load_spec": "capfleet.jobs.specs",
    "CaptionResult": "capfleet.jobs.api",
    "CompressResult": "capfleet.jobs.api",
    "TrainResult": "capfleet.jobs.api",
    "PipelineResult": "capfleet.jobs.api",
    "pipeline": "capfleet.jobs.api",
    "plan": "capfleet.jobs.api",
    "PlanResult": "capfleet.jobs.api",
    "Goal": "capfleet.compression.goal",
    "CaptionConfig": "capfleet.jobs.caption.caption_config",
    "CompressConfig": "capfleet.compression.settings",
    "TrialSettings": "capfleet.compression.settings",
    "TrainConfig": "capfleet.model.train_config",
    "TrainGrid": "capfleet.model.train_config",
    "PipelineConfig": "capfleet.jobs.pipeline",
    "CaptionTransform": "capfleet.jobs.caption.transform",
    "CapfleetError": "capfleet.core.errors",
    "DataError": "capfleet.core.errors",
}
__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'capfleet' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_API))

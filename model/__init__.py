"""Pure ML for capfleet: data, text, images, metrics, the captioner and its bundles. No Ray here."""

import os

# tensorflow-model-optimization works only with Keras 2 (tf_keras). This must be set before
# TensorFlow is first imported, and every entry point imports this package first.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

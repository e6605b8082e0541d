"""Shared fixtures: tiny generated data, no network."""

import model  # noqa: F401  (TF_USE_LEGACY_KERAS before any test imports TensorFlow)

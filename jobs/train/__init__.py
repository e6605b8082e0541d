"""The train job: a grid of variants as tasks (variants), frozen backbones' features first, across
the cluster (feature_job)."""

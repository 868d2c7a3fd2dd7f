"""mlbuild: Make for machine-learning pipelines, deciding by content fingerprints."""

__version__ = "0.1.0"

"""Running steps. No imports here: `python -m mlbuild.exec.worker` runs this file in every step."""

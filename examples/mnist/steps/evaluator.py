"""Evaluate step: test accuracy and loss of the trained model, as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

# TensorFlow's C++ libraries read these when they load: at module level, so that they
# are set before any import of tensorflow, also in a warm worker, which applies these
# literal writes while it imports ahead of the call (mlbuild/exec/warm.py). Without
# both, every TensorFlow step prints absl's and oneDNN's start-up lines twice (once per
# library: tensorflow, then keras); the log level alone does not silence oneDNN's.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # its custom ops: no gain at this size


def evaluate(data: Path, model: Path, metrics: Path) -> None:
    """Write {"accuracy": ..., "loss": ..., "test_images": ...} to `metrics`.

    The pipeline declares the file in `metrics`, so mlbuild records these
    numbers with the configuration that produced them (`mlbuild exp show`).
    """
    import tensorflow as tf

    with np.load(data) as arrays:
        x_test, y_test = arrays["x_test"], arrays["y_test"]
    net = tf.keras.models.load_model(model)
    loss, accuracy = net.evaluate(x_test, y_test, verbose=0)
    result = {"accuracy": float(accuracy), "loss": float(loss), "test_images": len(x_test)}
    metrics.write_text(json.dumps(result, indent=2) + "\n")
    print(f"evaluator: test accuracy {accuracy:.4f}, loss {loss:.4f}")

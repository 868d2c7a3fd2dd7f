"""Train step: a small Keras classifier, as in ZenML's caching example."""

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


def train(
    data: Path,
    model: Path,
    history: Path,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> None:
    """Fit a dense network on the normalized images; save the model and its history.

    The history is Keras's `History.history` (a list per metric, one value per
    epoch) with the epoch numbers added: the pipeline declares it in `plots`,
    and `mlbuild plots` draws each metric against the epoch.
    """
    import tensorflow as tf  # imported here: only the worker process pays for it

    tf.keras.utils.set_random_seed(seed)
    with np.load(data) as arrays:
        x_train, y_train = arrays["x_train"], arrays["y_train"]
    net = tf.keras.Sequential(
        [
            tf.keras.Input(shape=x_train.shape[1:]),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(128, activation="relu"),
            tf.keras.layers.Dense(10),
        ]
    )
    net.compile(
        optimizer=tf.keras.optimizers.Adam(learning_rate),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    fit = net.fit(x_train, y_train, epochs=epochs, batch_size=batch_size, verbose=2)
    net.save(model)
    per_epoch = {name: [float(v) for v in values] for name, values in fit.history.items()}
    history.write_text(json.dumps({"epoch": [e + 1 for e in fit.epoch], **per_epoch}, indent=1))

"""Train step: a small Keras classifier, as in ZenML's caching example."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


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
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ banner quiet
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

"""Keras InceptionV3, and the ``tf.Module`` it is saved as for the TensorFlow engine.

``bentoml.tensorflow`` cannot serve a plain Keras 3 model (its restored object has
no ``__call__``), so the model is wrapped in a ``tf.Module`` whose ``__call__`` is
a ``tf.function`` with a fixed signature. The graph takes uint8 pixels and does
Keras' InceptionV3 scaling itself (x / 127.5 - 1), as the OpenVINO IR does, so
callers of either engine never build floats.
"""

from __future__ import annotations

import tensorflow as tf

from .preprocessing import INPUT_SIZE

PIXELS_SPEC = tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, 3], tf.uint8, name="pixels")


def build_keras_model(weights: str | None) -> tf.keras.Model:
    """``weights``: "imagenet" (Keras download), a local weights file, or None (random)."""
    return tf.keras.applications.InceptionV3(weights=weights, classifier_activation="softmax")


class InceptionV3Serving(tf.Module):
    def __init__(self, keras_model: tf.keras.Model) -> None:
        super().__init__(name="inception_v3")
        self.keras_model = keras_model

    @tf.function(input_signature=[PIXELS_SPEC])
    def __call__(self, pixels: tf.Tensor) -> tf.Tensor:
        scaled = tf.cast(pixels, tf.float32) / 127.5 - 1.0
        return self.keras_model(scaled, training=False)

"""The TensorFlow side: Keras InceptionV3 wrapped for serving, and in-graph JPEG decoding.

``bentoml.tensorflow`` cannot serve a plain Keras 3 model (its restored object has
no ``__call__``), so the model is wrapped in a ``tf.Module`` whose ``__call__`` is
a ``tf.function`` with a fixed signature. The graph takes uint8 pixels and does
Keras' InceptionV3 scaling itself (x / 127.5 - 1), so callers never build floats.

``decode_jpegs`` turns a batch of JPEG files into those pixels inside TensorFlow,
with libjpeg's DCT downscaling, as ``preprocessing.prepare_image`` does with PIL's
``draft()``; the runner uses it for plain JPEGs, so only the file crosses the
process boundary.

``CompiledModel`` runs the model compiled by XLA for the batch sizes it is told.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

import numpy as np
import tensorflow as tf

from .memory import release_freed_memory
from .preprocessing import INPUT_SIZE

PIXELS_SPEC = tf.TensorSpec([None, INPUT_SIZE, INPUT_SIZE, 3], tf.uint8, name="pixels")
JPEGS_SPEC = tf.TensorSpec([None], tf.string, name="jpegs")
DCT_SCALES = (1, 2, 4, 8)  # what libjpeg can scale by while decoding

logger = logging.getLogger(__name__)


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


def decode_jpeg(jpeg: tf.Tensor) -> tf.Tensor:
    """One JPEG file to (299, 299, 3) uint8 RGB.

    libjpeg decodes at the largest scale (1, 1/2, 1/4, 1/8) that keeps both sides
    at least 299 pixels, the rule of PIL's ``draft()``; an antialiased bilinear
    resize (PIL's ``BILINEAR``) does the rest.
    """
    height, width = tf.unstack(tf.io.extract_jpeg_shape(jpeg)[:2])
    fits = tf.minimum(height, width) // INPUT_SIZE
    branch = tf.add_n([tf.cast(fits >= scale, tf.int32) for scale in DCT_SCALES[1:]])
    image = tf.switch_case(
        branch,
        [lambda scale=scale: tf.io.decode_jpeg(jpeg, channels=3, ratio=scale) for scale in DCT_SCALES],
    )
    resized = tf.image.resize(image, (INPUT_SIZE, INPUT_SIZE), method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


@tf.function(input_signature=[JPEGS_SPEC])
def decode_jpegs(jpegs: tf.Tensor) -> tf.Tensor:
    return tf.map_fn(decode_jpeg, jpegs, fn_output_signature=PIXELS_SPEC.dtype)


class CompiledModel:
    """The serving model, compiled by XLA for some batch sizes.

    XLA ran the model about 6% faster than TensorFlow's graph executor on the CPU
    (batch 1 and 8), but it compiles each batch size on its own, in 4-6 s of a core,
    and each compiled size holds 20-35 MiB (the first about 100 MiB). So
    a background thread compiles the configured sizes after the runner is up, and
    the plain graph answers every other size, and these until they are compiled.
    """

    def __init__(self, model: tf.Module, batch_sizes: Iterable[int]) -> None:
        self.plain = model
        self.compiled = tf.function(lambda pixels: model(pixels), jit_compile=True, input_signature=[PIXELS_SPEC])
        self.ready: set[int] = set()
        self.compiler = threading.Thread(target=self.compile, args=(tuple(batch_sizes),), name="xla", daemon=True)
        self.compiler.start()

    def __call__(self, pixels: tf.Tensor | np.ndarray) -> tf.Tensor:
        return (self.compiled if len(pixels) in self.ready else self.plain)(pixels)

    def compile(self, batch_sizes: tuple[int, ...]) -> None:
        for batch_size in batch_sizes:
            started = time.perf_counter()
            try:
                self.compiled(np.zeros((batch_size, INPUT_SIZE, INPUT_SIZE, 3), np.uint8))
            except Exception:
                logger.exception("XLA could not compile batch size %d; the plain graph serves it", batch_size)
                continue
            self.ready.add(batch_size)
            logger.info("XLA compiled the model for batch size %d in %.1f s", batch_size, time.perf_counter() - started)
        release_freed_memory()

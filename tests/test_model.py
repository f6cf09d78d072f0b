"""``CompiledModel`` in process: a batch size XLA compiled answers as TensorFlow's plain
graph does, and a size XLA cannot compile stays on the plain graph."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from inception_v3.preprocessing import prepare_image
from tests.conftest import CAT_JPEG


def test_compiled_batch_size_answers_as_the_plain_graph(saved_model: str) -> None:
    import bentoml

    from inception_v3.model import CompiledModel

    plain = bentoml.tensorflow.load_model(bentoml.models.get(saved_model))
    model = CompiledModel(plain, [2])
    model.compiler.join()
    assert model.ready == {2}
    pixels = np.stack([prepare_image(CAT_JPEG.read_bytes())] * 2)
    np.testing.assert_allclose(model(pixels).numpy(), plain(pixels).numpy(), rtol=1e-5)
    assert model(pixels[:1]).shape == (1, 1000)  # not compiled: the plain graph


def test_size_xla_cannot_compile_stays_on_the_plain_graph(caplog: pytest.LogCaptureFixture) -> None:
    import tensorflow as tf

    from inception_v3.model import PIXELS_SPEC, CompiledModel

    class StringOps(tf.Module):
        """Ops XLA has no kernels for."""

        @tf.function(input_signature=[PIXELS_SPEC])
        def __call__(self, pixels: tf.Tensor) -> tf.Tensor:
            return tf.strings.to_number(tf.strings.as_string(pixels[:, 0, 0, 0]))

    with caplog.at_level(logging.ERROR):
        model = CompiledModel(StringOps(), [1])
        model.compiler.join()
    assert model.ready == set()
    assert "XLA could not compile batch size 1" in caplog.text
    assert model(np.full((1, 299, 299, 3), 7, np.uint8)).numpy().tolist() == [7.0]

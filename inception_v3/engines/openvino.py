"""OpenVINO on CPUs: the IR ``save_model.py`` stores inside the model, no TensorFlow at run time.

The IR takes uint8 pixels: the conversion adds Keras' InceptionV3 scaling
(x / 127.5 - 1) to the graph with OpenVINO's PrePostProcessor. Weights stay fp32
in the IR (``compress_to_fp16=False``: exact fp32 answers); bf16 is a compile-time
hint (``INFERENCE_PRECISION_HINT``), which OpenVINO would pick by itself on AMX
CPUs; int8 is a separate IR quantized by NNCF on calibration images.

A model saved before the IR existed is converted from its SavedModel when it loads
(TensorFlow needed then, a few seconds); saving it again stores the IR.
"""

from __future__ import annotations

import logging
import threading
import typing as t
import warnings
from pathlib import Path

import numpy as np
import openvino as ov

from ..memory import drop_mapped_pages
from ..preprocessing import INPUT_SIZE
from . import EngineChoiceError, installed

if t.TYPE_CHECKING:
    import bentoml

IR_DIR = "openvino"
IR_FILES = {"fp32": "inception_v3_fp32.xml", "int8": "inception_v3_int8.xml"}  # bf16 compiles the fp32 IR
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16"}  # int8: OpenVINO's own choice for the layers left in float
# LATENCY: one stream over all cores, the batch split across them. THROUGHPUT's several
# streams serve one batch on one stream, slower for a runner that sends one batch at a time.
PERFORMANCE_HINT = "LATENCY"
# batch_limit "auto": parts of this many images per inference thread. Measured in process
# (bf16, AMX Xeon): per-image speed stops rising at 2 images on 1 core and at 3-4 on 2 cores,
# while every image more in a part keeps its buffers (parts of 4 against 8: 100 MiB less).
IMAGES_PER_THREAD = 2

logger = logging.getLogger(__name__)


def with_uint8_input(model: ov.Model) -> ov.Model:
    """The converted float model, taking uint8 NHWC pixels and scaling them in the graph."""
    ppp = ov.preprocess.PrePostProcessor(model)
    ppp.input().tensor().set_element_type(ov.Type.u8)
    ppp.input().preprocess().convert_element_type(ov.Type.f32).scale(127.5).mean(1.0)
    return ppp.build()


def convert(keras_model: t.Any) -> ov.Model:
    """Keras InceptionV3 (float input in [-1, 1]) to an OpenVINO model taking uint8 pixels."""
    with warnings.catch_warnings():
        # Keras warns that the traced input is a tensor, not its keras_tensor: harmless, and noise in make serve.
        warnings.filterwarnings("ignore", "The structure of `inputs` doesn't match", UserWarning)
        converted = ov.convert_model(keras_model, input=[(-1, INPUT_SIZE, INPUT_SIZE, 3)])
    return with_uint8_input(converted)


def quantize(model: ov.Model, calibration: list[np.ndarray]) -> ov.Model:
    """int8 by NNCF's post-training quantization; ``calibration``: (1, 299, 299, 3) uint8 batches."""
    import nncf

    return nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration))


def save_ir(model: ov.Model, model_dir: Path, precision: str) -> None:
    path = model_dir / IR_DIR / IR_FILES[precision]
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(path), compress_to_fp16=False)


def ir_path(bento_model: bentoml.Model, precision: str) -> Path:
    return Path(bento_model.path) / IR_DIR / IR_FILES["int8" if precision == "int8" else "fp32"]


def read_model(bento_model: bentoml.Model, precision: str) -> ov.Model:
    path = ir_path(bento_model, precision)
    if path.is_file():
        return ov.Core().read_model(str(path))
    if "tensorflow" not in installed():
        raise EngineChoiceError(
            f"{bento_model.tag} has no OpenVINO IR (saved before it was stored), and converting its "
            "SavedModel needs TensorFlow, which is not installed here: run save_model.py again "
            "where requirements-tensorflow.txt is installed, then serve the new version"
        )
    logger.warning(
        "%s has no OpenVINO IR (saved before it was stored): converting its SavedModel now; "
        "run save_model.py again to store the IR and start faster",
        bento_model.tag,
    )
    import tensorflow as tf

    module = tf.saved_model.load(bento_model.path)  # takes uint8 and scales in its graph already
    return ov.convert_model(module.__call__.get_concrete_function())


class OpenVinoEngine:
    """``batch_limit``: larger batches run in parts of that many images (0: whole; see ``part_size``).

    OpenVINO keeps the buffers of the largest batch it has run, and of every batch
    size, in the allocator's free lists: after batches of 1-16 a bf16 model held
    400-450 MiB more than after one of 1; with parts of at most 8, 180 MiB more.

    ``weights_file``: the IR's weights, whose mapped pages the first inference (the
    runner's warm-up) lays out in OpenVINO's own buffers; after it they are handed back
    (``memory.drop_mapped_pages``).
    """

    name = "openvino"

    def __init__(
        self, compiled: ov.CompiledModel, precision: str, batch_limit: int = 0, weights_file: Path | None = None
    ) -> None:
        self.precision = precision
        self.compiled = compiled
        self.batch_limit = batch_limit
        self.request = compiled.create_infer_request()
        self.lock = threading.Lock()  # one infer request, reused: one batch at a time
        self.weights_file = weights_file  # until the first inference

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.ascontiguousarray(pixels, np.uint8)
        count = max(len(pixels), 1)  # an empty batch still runs once, for its (0, 1000) answer
        step = self.batch_limit or count
        with self.lock:
            # Every call shares its input, the warm-up's too. After a shared call the compiled
            # model still points at the caller's array, freed once it returns; a copying call
            # (share_inputs=False) after it, on any of its requests, wrote into that freed
            # memory (OpenVINO 2026.4: glibc aborted with a corrupted heap within seconds).
            parts = [self.request.infer([pixels[i : i + step]], share_inputs=True)[0] for i in range(0, count, step)]
            if self.weights_file:
                drop_mapped_pages(self.weights_file)
                self.weights_file = None
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


def part_size(batch_limit: int | str, inference_threads: int) -> int:
    """The ``openvino_batch_limit`` setting as images per part: ``auto`` follows the threads OpenVINO computes on."""
    return IMAGES_PER_THREAD * inference_threads if batch_limit == "auto" else int(batch_limit)


def load(bento_model: bentoml.Model, precision: str, batch_limit: int | str = 0, **_: t.Any) -> OpenVinoEngine:
    config = {"PERFORMANCE_HINT": PERFORMANCE_HINT}
    if precision in INFERENCE_PRECISION:
        config["INFERENCE_PRECISION_HINT"] = INFERENCE_PRECISION[precision]
    compiled = ov.Core().compile_model(read_model(bento_model, precision), "CPU", config)
    threads = int(compiled.get_property("INFERENCE_NUM_THREADS"))
    part = part_size(batch_limit, threads)
    logger.info("OpenVINO computes on %d threads; batches run in parts of %s", threads, part or "any size")
    return OpenVinoEngine(compiled, precision, part, ir_path(bento_model, precision).with_suffix(".bin"))

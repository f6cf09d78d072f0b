"""Build Inception v3 and save it to the BentoML model store as ``inception_v3``.

    python save_model.py                       # ImageNet weights, downloaded by Keras
    python save_model.py --imagenet-or-random  # the same, or random weights if the download fails (make serve)
    python save_model.py --weights FILE.h5     # a local weights file (offline)
    python save_model.py --random-weights      # random weights (tests, CI, offline demos)
    python save_model.py --int8-calibration DIR   # also an int8 version, calibrated on DIR's images

One model holds what every engine needs: the TensorFlow SavedModel (GPU engine)
and the OpenVINO IR (CPU engine, fp32 weights; bf16 is chosen when it compiles),
plus int8 IR when calibration images are given. Each run adds a version;
``bentoml models list`` shows them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import sys
from pathlib import Path

import bentoml
import numpy as np

from inception_v3.labels import load_class_names
from inception_v3.preprocessing import INPUT_SIZE, prepare_image
from inception_v3.weights import FILE, IMAGENET, RANDOM, REAL_WEIGHTS_COMMAND, WEIGHTS_FILE_NAME

MODEL_NAME = "inception_v3"
# Per connect and read of the ImageNet download: without a network the fallback comes quickly.
DOWNLOAD_TIMEOUT_S = 10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, help="local Keras weights file (.h5 or .weights.h5)")
    source.add_argument("--random-weights", action="store_true", help="random weights, no download")
    source.add_argument(
        "--imagenet-or-random", action="store_true", help="ImageNet weights, or random ones if the download fails"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights")
    parser.add_argument(
        "--serving-version",
        type=int,
        help="integer version TensorFlow Serving clients see (default: 1 for the first model, then one more each time)",
    )
    parser.add_argument(
        "--int8-calibration",
        type=Path,
        metavar="DIR",
        help="a folder of images like the traffic (a few hundred is typical): quantize to int8 on them with NNCF",
    )
    return parser.parse_args(argv)


def next_serving_version() -> int:
    try:
        existing = bentoml.models.list(MODEL_NAME)
    except bentoml.exceptions.NotFound:
        existing = []
    versions = [m.info.metadata.get("serving_version", -1) for m in existing]
    return max(versions, default=0) + 1  # 1, 2, ... as TensorFlow Serving numbers its versions


def calibration_set(folder: Path) -> tuple[list[np.ndarray], dict[str, object]]:
    """Every image file in ``folder``, preprocessed as the service does, and a record of the set."""
    from inception_v3.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType

    batches, digest = [], hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        data = path.read_bytes()
        try:
            pixels = prepare_image(data)
        except (InvalidImage, PayloadTooLarge, UnsupportedMediaType):
            continue
        batches.append(pixels[np.newaxis])
        digest.update(hashlib.sha256(data).digest())
    if not batches:
        raise ValueError(f"{folder} holds no image the service can read")
    return batches, {"images": len(batches), "sha256": digest.hexdigest()}


def download_failed(error: Exception) -> str:
    """Keras wraps urllib's error in a plain Exception that repeats the long URL; urllib's reason is shorter."""
    reason = getattr(error.__context__, "reason", None)
    return f"could not download the ImageNet weights ({reason or error})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.int8_calibration and not args.int8_calibration.is_dir():
        print(f"error: calibration folder {args.int8_calibration} does not exist", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's start-up noise (CUDA probes, CPU notices)
    import openvino as ov
    import tensorflow as tf

    from inception_v3.engines import openvino as ov_engine
    from inception_v3.model import InceptionV3Serving, build_keras_model

    if args.random_weights:
        weights, recorded = (
            None,
            {"weights": RANDOM, "weights_source": f"random weights (seed {args.seed}) were asked for"},
        )
    elif args.weights:
        if not args.weights.is_file():
            print(f"error: weights file {args.weights} does not exist", file=sys.stderr)
            return 2
        path = str(args.weights.resolve())
        weights, recorded = path, {"weights": FILE, "weights_file": path, "weights_source": f"file {path}"}
    else:
        weights, recorded = "imagenet", {"weights": IMAGENET, "weights_source": "ImageNet, Keras download"}
    tf.keras.utils.set_random_seed(args.seed)  # the initial weights, which a random model keeps
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        keras_model = build_keras_model(weights)
    except Exception as error:  # Keras raises plain Exception for a failed download
        if weights is None:
            raise
        if weights != "imagenet":  # h5py's OSError for a file that is not HDF5, Keras' ValueError for other weights
            reason = str(error).strip().partition("\n")[0] or type(error).__name__
            print(f"error: {weights} is not Keras Inception v3 weights: {reason}", file=sys.stderr)
            return 2
        if not args.imagenet_or_random:
            print(
                f"error: {download_failed(error)}. Offline: {REAL_WEIGHTS_COMMAND} (copied from a machine with "
                "internet), or make serve WEIGHTS=random (a model that runs but does not know cats); "
                f"save_model.py takes --weights {WEIGHTS_FILE_NAME} or --random-weights.",
                file=sys.stderr,
            )
            return 2
        print(f"warning: {download_failed(error)}: saving random weights instead", file=sys.stderr)
        keras_model = build_keras_model(None)
        recorded = {"weights": RANDOM, "weights_source": f"{download_failed(error)}, so random ones were saved"}
    finally:
        socket.setdefaulttimeout(timeout)

    ir = ov_engine.convert(keras_model)
    precisions, int8_ir, calibration = ["fp32", "bf16"], None, None
    if args.int8_calibration:
        try:
            images, calibration = calibration_set(args.int8_calibration)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        int8_ir = ov_engine.quantize(ir, images)
        precisions.append("int8")
    with bentoml.models.create(
        MODEL_NAME,
        module="bentoml.tensorflow",  # the SavedModel at the top loads with bentoml.tensorflow too
        signatures={"__call__": {"batchable": True, "batch_dim": 0}},
        custom_objects={"class_names": load_class_names()},
        metadata={
            **recorded,
            # TensorFlow Serving clients address integer versions.
            "serving_version": args.serving_version if args.serving_version is not None else next_serving_version(),
            "input": f"uint8 RGB [batch, {INPUT_SIZE}, {INPUT_SIZE}, 3]",
            "preprocessing": "resize to 299x299 (bilinear), scale x / 127.5 - 1 in the graph",
            "output": "softmax over 1000 ImageNet classes",
            "tensorflow": tf.__version__,
            "openvino": ov.__version__,
            "openvino_precisions": precisions,
            **({"int8_calibration": calibration} if calibration else {}),
        },
        context=bentoml.models.ModelContext(
            framework_name="tensorflow", framework_versions={"tensorflow": tf.__version__, "openvino": ov.__version__}
        ),
    ) as saved:
        tf.saved_model.save(InceptionV3Serving(keras_model), saved.path)
        ov_engine.save_ir(ir, Path(saved.path), "fp32")
        if int8_ir is not None:
            ov_engine.save_ir(int8_ir, Path(saved.path), "int8")
        # BentoML makes the folder 0700 (a temporary directory): readable by the serving
        # container's user (uid 1034) too when this store is mounted in it, as its files are.
        os.chmod(saved.path, 0o755)
    print(saved.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())

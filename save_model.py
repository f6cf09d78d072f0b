"""Build Inception v3 and save it to the BentoML model store as ``inception_v3``.

    python save_model.py                     # ImageNet weights, downloaded by Keras
    python save_model.py --weights FILE.h5   # a local weights file (offline)
    python save_model.py --random-weights    # random weights (tests, CI, offline demos)

Each run adds a version; ``bentoml models list`` shows them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import bentoml

from inception_v3.labels import load_class_names
from inception_v3.preprocessing import INPUT_SIZE

MODEL_NAME = "inception_v3"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", type=Path, help="local Keras weights file (.h5 or .weights.h5)")
    source.add_argument("--random-weights", action="store_true", help="random weights, no download")
    parser.add_argument("--seed", type=int, default=0, help="seed for --random-weights")
    parser.add_argument(
        "--serving-version",
        type=int,
        help="integer version TensorFlow Serving clients see (default: 0 for the first model, then one more each time)",
    )
    return parser.parse_args(argv)


def next_serving_version() -> int:
    try:
        existing = bentoml.models.list(MODEL_NAME)
    except bentoml.exceptions.NotFound:
        existing = []
    versions = [m.info.metadata.get("serving_version", -1) for m in existing]
    return max(versions, default=-1) + 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import tensorflow as tf

    from inception_v3.model import InceptionV3Serving, build_keras_model

    if args.random_weights:
        tf.keras.utils.set_random_seed(args.seed)
        weights, source = None, f"random (seed {args.seed})"
    elif args.weights:
        if not args.weights.is_file():
            print(f"error: weights file {args.weights} does not exist", file=sys.stderr)
            return 2
        weights, source = str(args.weights.resolve()), f"file {args.weights.name}"
    else:
        weights, source = "imagenet", "imagenet (Keras download)"
    try:
        keras_model = build_keras_model(weights)
    except Exception as error:  # Keras raises plain Exception for a failed download
        if weights != "imagenet":
            raise
        print(
            f"error: could not download the ImageNet weights ({error}).\n"
            "Offline options: python save_model.py --weights inception_v3_weights_tf_dim_ordering_tf_kernels.h5 "
            "(a file copied from a machine with internet), or --random-weights (a model that runs but "
            "does not know cats).",
            file=sys.stderr,
        )
        return 2

    saved = bentoml.tensorflow.save_model(
        MODEL_NAME,
        InceptionV3Serving(keras_model),
        signatures={"__call__": {"batchable": True, "batch_dim": 0}},
        custom_objects={"class_names": load_class_names()},
        metadata={
            "weights": source,
            # TensorFlow Serving clients address integer versions.
            "serving_version": args.serving_version if args.serving_version is not None else next_serving_version(),
            "input": f"uint8 RGB [batch, {INPUT_SIZE}, {INPUT_SIZE}, 3]",
            "preprocessing": "resize to 299x299 (bilinear), scale x / 127.5 - 1 in the graph",
            "output": "softmax over 1000 ImageNet classes",
            "tensorflow": tf.__version__,
        },
    )
    print(saved.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())

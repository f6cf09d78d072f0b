"""Which weights a saved model holds, and what is said about a model with random ones.

``save_model.py`` records them in the model's metadata: ``weights`` is ``imagenet``
(Keras' download), ``file`` (a local weights file, its path in ``weights_file``)
or ``random``; ``weights_source`` says how in words. A random model runs and
answers, but its labels mean nothing, so the runner's start-up log, ``/readyz``, the TF
Serving metadata and every prediction answer say so, ``make serve`` ends with a
notice, and the container build refuses it unless asked.

    python -m inception_v3.weights has WEIGHTS   # exit 0 if the store's latest model has them (auto: any model)
    python -m inception_v3.weights notice        # the notice make serve ends with (nothing for real weights)
"""

from __future__ import annotations

import argparse
import sys
import typing as t
from collections.abc import Mapping
from pathlib import Path

IMAGENET, FILE, RANDOM = "imagenet", "file", "random"
AUTO = "auto"  # make serve's default: ImageNet if the download works, else random
WEIGHTS_FILE_NAME = "inception_v3_weights_tf_dim_ordering_tf_kernels.h5"
WEIGHTS_URL = f"https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/{WEIGHTS_FILE_NAME}"
RANDOM_WARNING = "random weights: this model was never trained, its labels are meaningless"
REAL_WEIGHTS_COMMAND = f"make serve WEIGHTS=/path/to/{WEIGHTS_FILE_NAME}"

Metadata = Mapping[str, t.Any]


def kind(metadata: Metadata) -> str:
    """imagenet, file or random; models saved before ``weights_source`` existed said "random (seed 0)"."""
    return str(metadata.get("weights", "")).split(" ")[0]


def warning(metadata: Metadata) -> str | None:
    return RANDOM_WARNING if kind(metadata) == RANDOM else None


def has_weights(metadata: Metadata, requested: str) -> bool:
    """Whether a model saved with ``metadata`` is what ``make serve WEIGHTS=requested`` asks for."""
    if requested == AUTO:
        return True
    if requested in (IMAGENET, RANDOM):
        return kind(metadata) == requested
    return kind(metadata) == FILE and metadata.get("weights_file") == str(Path(requested).resolve())


def notice(tag: str, metadata: Metadata) -> str | None:
    """The block ``make serve`` ends with when it serves random weights."""
    if warning(metadata) is None:
        return None
    rule = "=" * 78
    return "\n".join(
        [
            rule,
            f"WARNING: {tag} has RANDOM WEIGHTS: every label it answers is meaningless.",
            f"Why: {metadata.get('weights_source', 'random weights were asked for')}.",
            f"Real weights from a local file ({WEIGHTS_FILE_NAME}, from ~/.keras/models/",
            f"of a machine with internet, or {WEIGHTS_URL}):",
            f"    {REAL_WEIGHTS_COMMAND}",
            rule,
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("has").add_argument("weights", help="auto, imagenet, random or a weights file")
    commands.add_parser("notice")
    args = parser.parse_args(argv)

    import bentoml

    from .settings import load_settings

    try:
        model = bentoml.models.get(load_settings().model_tag)
    except bentoml.exceptions.NotFound:
        return 1
    metadata = model.info.metadata
    if args.command == "has":
        if not has_weights(metadata, args.weights):
            return 1
        print(f"model: {model.tag} - {metadata.get('weights_source', metadata.get('weights'))}")
    elif block := notice(str(model.tag), metadata):
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())

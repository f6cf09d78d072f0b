"""How far each engine and precision strays from TensorFlow fp32, on your images.

    python -m benchmarks.agreement --images DIR                  # the model in the store (inception_v3:latest)
    python -m benchmarks.agreement --images DIR --weights FILE   # a model built from a Keras weights file

For every engine and precision this CPU runs (OpenVINO fp32, bf16 where the CPU has
it, int8 where the model has it), against TensorFlow fp32 on the same weights and
the same decoded pixels: top-1 agreement (the same best class), top-5 agreement
(TensorFlow's best class among the engine's five best) and the largest difference
in any probability. With ``--weights`` the model is saved in a temporary store,
int8 calibrated on ``--calibration DIR`` (default: the images themselves, which
flatters int8 a little; use a separate folder for a fair figure).

Random weights give near-uniform outputs (the largest probability is about 0.001),
so their top-1 agreement means nothing: the script says so and the numeric
differences are what to read.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

BATCH_SIZE = 16
NEAR_UNIFORM = 0.01  # a largest probability under this: the model knows nothing


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="a folder of images (JPEG, PNG, WebP, BMP, GIF)")
    parser.add_argument("--weights", type=Path, help="Keras weights file (.h5): build and save a model from it")
    parser.add_argument("--calibration", type=Path, help="images for int8 with --weights (default: --images)")
    return parser.parse_args(argv)


def read_images(folder: Path) -> tuple[list[str], np.ndarray]:
    from inception_v3.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
    from inception_v3.preprocessing import prepare_image

    names, pixels = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            pixels.append(prepare_image(path.read_bytes()))
        except (InvalidImage, PayloadTooLarge, UnsupportedMediaType):
            continue
        names.append(path.name)
    if not names:
        raise SystemExit(f"error: {folder} holds no image the service can read")
    return names, np.stack(pixels)


def in_batches(engine, pixels: np.ndarray) -> np.ndarray:
    return np.concatenate([engine(pixels[i : i + BATCH_SIZE]) for i in range(0, len(pixels), BATCH_SIZE)])


def compare(reference: np.ndarray, answer: np.ndarray) -> dict[str, float]:
    best = reference.argmax(axis=1)
    top5 = np.argsort(-answer, axis=1)[:, :5]
    return {
        "top1": float((answer.argmax(axis=1) == best).mean()),
        "top5": float((top5 == best[:, None]).any(axis=1).mean()),
        "max_abs_diff": float(np.abs(answer - reference).max()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.weights:
        os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="agreement-")
    import bentoml

    import save_model
    from inception_v3 import engines

    if args.weights:
        calibration = args.calibration or args.images
        saved = ["--weights", str(args.weights), "--int8-calibration", str(calibration)]
        if save_model.main(saved) != 0:
            return 2
    bento_model = bentoml.models.get("inception_v3:latest")
    names, pixels = read_images(args.images)
    offered = bento_model.info.metadata["openvino_precisions"]
    has_bf16 = any(flag in engines.cpu_flags() for flag in engines.BF16_FLAGS)
    reference = in_batches(engines.load(engines.choose("tensorflow", "fp32", offered), bento_model), pixels)
    weights = bento_model.info.metadata.get("weights", "unknown")
    print(f"{bento_model.tag} (weights: {weights}), {len(names)} images from {args.images}; reference TensorFlow fp32")
    if weights.startswith("random") or reference.max() < NEAR_UNIFORM:
        print(
            "warning: this model's outputs are near-uniform (random weights: largest probability "
            f"{reference.max():.4f}), so top-1 and top-5 agreement mean nothing here; read the differences. "
            "For real figures: --weights inception_v3_weights_tf_dim_ordering_tf_kernels.h5"
        )
    print(f"{'engine':<18}{'top-1':>8}{'top-5':>8}{'max |dp|':>12}")
    for precision in ("fp32", "bf16", "int8"):
        name = f"openvino {precision}"
        if precision == "bf16" and not has_bf16:
            print(f"{name:<18}  skipped: this CPU has no AMX-BF16 or AVX512_BF16")
            continue
        if precision not in offered:
            print(f"{name:<18}  skipped: the model has no {precision} IR (save_model.py --int8-calibration)")
            continue
        engine = engines.load(engines.choose("openvino", precision, offered), bento_model)
        figures = compare(reference, in_batches(engine, pixels))
        print(f"{name:<18}{figures['top1']:>8.1%}{figures['top5']:>8.1%}{figures['max_abs_diff']:>12.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

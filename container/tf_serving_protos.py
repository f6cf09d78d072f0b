"""Copy TF Serving's protobuf modules into the project, for images without TensorFlow.

    python -m container.tf_serving_protos     # after changing the TensorFlow pins

``tensorflow-serving-api`` depends on all of TensorFlow (about 2 GB installed, with
Keras, TensorBoard and their libraries) for 49 generated ``*_pb2.py`` modules (150 KB)
that the TF Serving doors import. The CPU image leaves both out and imports these
copies instead (``inception_v3/protocols/tfserving.py``); ``tests/test_without_tensorflow.py``
checks that they equal the installed ones. TensorFlow and TF Serving are Apache-2.0
(``inception_v3/protocols/tf_serving_protos/NOTICE``).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from inception_v3.protocols.tfserving import VENDORED_PROTOS, import_tf_serving_apis

PACKAGES = ("tensorflow", "tensorflow_serving")


def installed_modules() -> dict[str, Path]:
    """The modules TF Serving's doors import, with their packages' ``__init__.py``: relative path -> file."""
    import_tf_serving_apis()
    files = {}
    for name, module in sys.modules.items():
        path = getattr(module, "__file__", None)
        if name.partition(".")[0] in PACKAGES and path:
            relative = name.replace(".", "/") + ("/__init__.py" if path.endswith("__init__.py") else ".py")
            files[relative] = Path(path)
    return dict(sorted(files.items()))


def main() -> None:
    for package in PACKAGES:
        shutil.rmtree(VENDORED_PROTOS / package, ignore_errors=True)
    modules = installed_modules()
    for relative, source in modules.items():
        target = VENDORED_PROTOS / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    print(f"copied {len(modules)} modules into {VENDORED_PROTOS}")


if __name__ == "__main__":
    main()

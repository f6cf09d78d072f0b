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

import json
import shutil
import subprocess
import sys
from pathlib import Path

from inception_v3.protocols.tfserving import VENDORED_PROTOS
from inception_v3.settings import PROJECT_ROOT

PACKAGES = ("tensorflow", "tensorflow_serving")


LIST_MODULES = """
import json, sys
from inception_v3.protocols.tfserving import import_tf_serving_apis
import_tf_serving_apis()
print(json.dumps({name: getattr(module, "__file__", None) for name, module in sys.modules.items()}))
"""


def installed_modules() -> dict[str, Path]:
    """The modules TF Serving's doors import, with their packages' ``__init__.py``: relative path -> file.

    Listed by a fresh interpreter: one that has imported TensorFlow holds far more.
    """
    listed = subprocess.run(
        [sys.executable, "-c", LIST_MODULES], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    )
    files = {}
    for name, path in json.loads(listed.stdout.strip().splitlines()[-1]).items():
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

"""The CPU image carries no TensorFlow (bentofile.yaml): the service must serve without it.

Its TF Serving doors import copies of TF Serving's protobuf modules
(``inception_v3/protocols/tf_serving_protos``, made by ``container/tf_serving_protos.py``),
which must equal the installed ones. The service is then served in process from
this environment's packages less TensorFlow, TF Serving's API and Keras (a folder of
links to the rest), and answers as the OpenVINO engine does here.
``tests/test_image.py`` checks the image itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from container.tf_serving_protos import installed_modules
from inception_v3.protocols.tfserving import VENDORED_PROTOS
from tests.conftest import ROOT

HIDDEN = ("tensorflow", "tensorflow_serving", "keras")  # and their .dist-info

SERVE_WITHOUT_TENSORFLOW = """
import base64, json, site, sys
site.addsitedir(sys.argv[1])
from starlette.testclient import TestClient
import service
from inception_v3 import engines

image = open(sys.argv[2], "rb").read()
with TestClient(service.svc.asgi_app) as client:
    predicted = client.post("/predict?top_k=3", content=image, headers={"Content-Type": "image/jpeg"})
    tf_serving = client.post(
        "/v1/models/inception_v3:predict",
        json={"instances": [{"image": {"b64": base64.urlsafe_b64encode(image).decode()}}]},
    )
print(json.dumps({
    "predict": [predicted.status_code, predicted.json()],
    "tf_serving": [tf_serving.status_code, tf_serving.json()],
    "installed": engines.installed(),
    "tensorflow_loaded": "tensorflow.python" in sys.modules,
}))
"""


def test_the_vendored_tf_serving_protos_equal_the_installed_ones() -> None:
    vendored = {str(path.relative_to(VENDORED_PROTOS)) for path in VENDORED_PROTOS.rglob("*.py")}
    installed = installed_modules()
    assert vendored == set(installed), "run: python -m container.tf_serving_protos"
    for relative, source in installed.items():
        assert (VENDORED_PROTOS / relative).read_bytes() == source.read_bytes(), relative


@pytest.fixture(scope="module")
def site_without_tensorflow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site_packages = Path(sysconfig.get_paths()["purelib"])
    linked = tmp_path_factory.mktemp("site-without-tensorflow")
    for entry in site_packages.iterdir():
        name = entry.name.split("-")[0].lower().replace("-", "_")
        if name not in HIDDEN:
            (linked / entry.name).symlink_to(entry)
    return linked


def test_the_service_serves_without_tensorflow(
    saved_model: str, site_without_tensorflow: Path, cat_jpeg: bytes, tmp_path: Path
) -> None:
    image = tmp_path / "cat.jpg"
    image.write_bytes(cat_jpeg)
    served = subprocess.run(
        [sys.executable, "-S", "-c", SERVE_WITHOUT_TENSORFLOW, str(site_without_tensorflow), str(image)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert served.returncode == 0, served.stderr[-3000:]
    answers = json.loads(served.stdout.strip().splitlines()[-1])
    assert answers["installed"] == ["openvino"]
    assert not answers["tensorflow_loaded"]
    status, prediction = answers["predict"]
    assert status == 200 and len(prediction["top_k"]) == 3
    status, tf_serving = answers["tf_serving"]
    assert status == 200 and tf_serving["predictions"] == [prediction["label"]]

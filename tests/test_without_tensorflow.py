"""The CPU image carries no TensorFlow (bentofile.yaml): the service must serve without it.

Its TF Serving doors import copies of TF Serving's protobuf modules
(``inception_v3/protocols/tf_serving_protos``, made by ``container/tf_serving_protos.py``),
which must equal the installed ones. The service is then served in process from
this environment's packages less TensorFlow, TF Serving's API and Keras (a folder of
links to the rest), and answers as the OpenVINO engine does here.
``tests/test_image.py`` checks the image itself.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from container.tf_serving_protos import installed_modules
from inception_v3.protocols.tfserving import VENDORED_PROTOS
from tests.conftest import ROOT

HIDDEN = ("tensorflow", "tensorflow_serving", "keras")  # and their .dist-info
# Imported inside the functions that need them, never while serving on a CPU.
IMPORTED_WHEN_NEEDED = {"tensorflow", "nncf"}  # the TensorFlow engine, save_model.py (--int8-calibration)

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


def test_every_package_the_serving_code_imports_comes_with_requirements_txt() -> None:
    """Not through TensorFlow: Pillow did, until the image went without it."""
    provided = set()
    for distribution in dependency_closure(requirement_names(ROOT / "requirements.txt")):
        provided |= top_level_modules(distribution)
    imported = set()
    for path in [ROOT / "service.py", *(ROOT / "inception_v3").rglob("*.py"), *(ROOT / "client").glob("*.py")]:
        if VENDORED_PROTOS not in path.parents:
            imported |= top_level_imports(path)
    third_party = imported - set(sys.stdlib_module_names) - {"inception_v3", "client", "service"}
    assert third_party - provided - IMPORTED_WHEN_NEEDED == set()


def requirement_names(path: Path) -> list[Requirement]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith(("#", "-r"))]


def dependency_closure(requirements: list[Requirement]) -> list[importlib.metadata.Distribution]:
    """The installed distributions ``requirements`` pull in, extras and markers followed."""
    found: dict[str, importlib.metadata.Distribution] = {}
    pending = [(requirement, requirement.extras or {""}) for requirement in requirements]
    while pending:
        requirement, extras = pending.pop()
        key = requirement.name.lower().replace("_", "-")
        if key in found:
            continue
        found[key] = importlib.metadata.distribution(requirement.name)
        for text in found[key].requires or []:
            needed = Requirement(text)
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra}) for extra in extras):
                pending.append((needed, needed.extras or {""}))
    return list(found.values())


def top_level_modules(distribution: importlib.metadata.Distribution) -> set[str]:
    return {
        file.parts[0].removesuffix(".py")
        for file in distribution.files or []
        if file.parts and not file.parts[0].endswith((".dist-info", ".data")) and file.parts[0] != ".."
    }


def top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names

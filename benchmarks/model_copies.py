"""New versions of a saved model in a model store, in a second instead of a save's 20 s.

For the version tests and the swap benchmark: a copy of a saved model's folder under
a new BentoML version and a new ``serving_version``, as ``save_model.py`` would
leave it (same weights, so the same answers: what tells the versions apart is the
version each answer names). ``broken=True`` makes its OpenVINO IR unreadable, a
version that fails to load. The copy appears in the store at once (a rename), as a
save's does.
"""

from __future__ import annotations

import datetime
import secrets
import shutil
import tempfile
from pathlib import Path

import yaml

IR_FILES = ("inception_v3_fp32.xml", "inception_v3_int8.xml")


def model_dir(store: Path, tag: str) -> Path:
    name, _, version = tag.partition(":")
    if version in ("", "latest"):
        version = (store / name / "latest").read_text().strip()
    return store / name / version


def add_version(store: Path, source_tag: str, serving_version: int, broken: bool = False) -> str:
    """Copy ``source_tag`` in ``store`` (a model store folder) as ``serving_version``; its new tag."""
    source = model_dir(store, source_tag)
    info = yaml.safe_load((source / "model.yaml").read_text())
    info["version"] = secrets.token_hex(8)
    info["metadata"]["serving_version"] = serving_version
    info["creation_time"] = datetime.datetime.now(datetime.UTC).isoformat()
    staging = Path(tempfile.mkdtemp(dir=store.parent)) / info["version"]  # beside the store: one rename away
    shutil.copytree(source, staging)
    (staging / "model.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
    if broken:
        for name in IR_FILES:
            if (staging / "openvino" / name).exists():
                (staging / "openvino" / name).write_text("not an OpenVINO IR")
    staging.rename(source.parent / info["version"])
    staging.parent.rmdir()
    (source.parent / "latest").write_text(info["version"])
    return f"{info['name']}:{info['version']}"


def copy_model(source_store: Path, tag: str, store: Path) -> str:
    """``tag`` from one store into another (a store of its own for a test); its tag."""
    source = model_dir(source_store, tag)
    target = store / source.parent.name / source.name
    shutil.copytree(source, target)
    (target.parent / "latest").write_text(source.name)
    return f"{source.parent.name}:{source.name}"

"""The engines in process: OpenVINO fp32 answers as TensorFlow fp32 does (a batch in
parts too), the reduced precisions run, ``auto`` follows the CPU's flags, int8 is saved from calibration
images, a model saved before the OpenVINO IR still loads, and XLA stays optional."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from inception_v3 import engines
from inception_v3.preprocessing import prepare_image
from tests.conftest import CAT_JPEG, ROOT
from tests.images import encode, picture, valid_samples


@pytest.fixture(scope="module")
def batch() -> np.ndarray:
    """The cat and every sample format: different pixels, one batch."""
    images = [CAT_JPEG.read_bytes(), *valid_samples().values()]
    return np.stack([prepare_image(data) for data in images])


@pytest.fixture(scope="module")
def bento_model(saved_model: str):
    import bentoml

    return bentoml.models.get(saved_model)


def load(bento_model, engine: str, precision: str, **options):
    choice = engines.choose(engine, precision, bento_model.info.metadata["openvino_precisions"])
    return engines.load(choice, bento_model, **options)


@pytest.fixture(scope="module")
def tensorflow_fp32(bento_model, batch) -> np.ndarray:
    return load(bento_model, "tensorflow", "fp32")(batch)


def test_openvino_fp32_equals_tensorflow_fp32(bento_model, batch, tensorflow_fp32) -> None:
    answer = load(bento_model, "openvino", "fp32")(batch)
    assert answer.shape == (len(batch), 1000) and answer.dtype == np.float32
    np.testing.assert_allclose(answer, tensorflow_fp32, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("batch_limit", [1, 2])
def test_openvino_batch_in_parts_answers_as_whole(bento_model, batch, tensorflow_fp32, batch_limit: int) -> None:
    answer = load(bento_model, "openvino", "fp32", batch_limit=batch_limit)(batch)
    np.testing.assert_allclose(answer, tensorflow_fp32, rtol=1e-4, atol=1e-7)


def resident_mib(path: Path) -> float:
    """This process's resident pages of ``path``'s mappings, from ``/proc/self/smaps``."""
    kib, mapped = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header: address range, perms, offset, device, inode
            mapped = len(fields) == 6 and fields[5] == str(path.resolve())
        elif mapped and fields[0] == "Rss:":
            kib += int(fields[1])
    return kib / 1024


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only")
def test_openvino_keeps_little_of_its_ir_file_resident(bento_model, batch, tensorflow_fp32) -> None:
    """Once its first inference (the runner's warm-up) has laid the weights out, the engine hands the
    IR file's pages back (``memory.drop_mapped_pages``); what it reads again comes back in, and the
    answers stay exact."""
    from inception_v3.engines.openvino import ir_path

    engine = load(bento_model, "openvino", "fp32")
    engine(np.zeros((1, *batch.shape[1:]), np.uint8))
    weights = ir_path(bento_model, "fp32").with_suffix(".bin")
    file_mib = weights.stat().st_size / 2**20
    assert resident_mib(weights) < 0.05 * file_mib
    np.testing.assert_allclose(engine(batch), tensorflow_fp32, rtol=1e-4, atol=1e-7)  # a batch size not run before
    assert resident_mib(weights) < 0.25 * file_mib


def test_openvino_batch_limit_auto_is_two_images_per_inference_thread(bento_model) -> None:
    engine = load(bento_model, "openvino", "fp32", batch_limit="auto")
    threads = int(engine.compiled.get_property("INFERENCE_NUM_THREADS"))
    assert engine.batch_limit == 2 * threads
    assert load(bento_model, "openvino", "fp32", batch_limit=0).batch_limit == 0


def test_openvino_bf16_runs_close_to_fp32(bento_model, batch, tensorflow_fp32) -> None:
    """Random weights give near-uniform outputs: only the numbers can be compared, not top-1 (README)."""
    answer = load(bento_model, "openvino", "bf16")(batch)
    np.testing.assert_allclose(answer.sum(axis=1), 1, rtol=1e-3)
    assert np.abs(answer - tensorflow_fp32).max() < 1e-4


@pytest.mark.parametrize(
    ("engine", "precision", "flags", "gpu", "expected"),
    [
        ("auto", "auto", {"avx2", "avx512f", "avx512_bf16"}, False, ("openvino", "bf16", "CPU")),
        ("auto", "auto", {"avx2", "amx_bf16", "amx_int8"}, False, ("openvino", "bf16", "CPU")),
        ("auto", "auto", {"avx2", "fma"}, False, ("openvino", "fp32", "CPU")),
        ("auto", "auto", set(), False, ("openvino", "fp32", "CPU")),
        ("auto", "auto", {"avx512_bf16"}, True, ("tensorflow", "fp32", "GPU")),
        ("tensorflow", "auto", {"amx_bf16"}, False, ("tensorflow", "fp32", "CPU")),
        ("openvino", "fp32", {"amx_bf16"}, True, ("openvino", "fp32", "CPU")),
        ("auto", "int8", {"avx2"}, False, ("openvino", "int8", "CPU")),
    ],
)
def test_auto_follows_the_cpu_flags_and_the_gpu(engine, precision, flags, gpu, expected) -> None:
    choice = engines.choose(engine, precision, ("fp32", "bf16", "int8"), flags, gpu)
    assert (choice.engine, choice.precision, choice.device) == expected
    assert set(choice.cpu_flags) == flags & set(engines.REPORTED_FLAGS)


def test_without_tensorflow_a_gpu_host_runs_openvino() -> None:
    """The CPU image carries no TensorFlow: ``auto`` never picks it there, and naming it says why."""
    choice = engines.choose("auto", "auto", ("fp32", "bf16"), {"avx512_bf16"}, gpu=True, available=("openvino",))
    assert (choice.engine, choice.precision, choice.device) == ("openvino", "bf16", "CPU")
    with pytest.raises(engines.EngineChoiceError, match="set engine to auto or openvino"):
        engines.choose("tensorflow", "auto", ("fp32",), available=("openvino",))


@pytest.mark.parametrize(
    ("engine", "precision", "offered", "message"),
    [
        ("openvino", "int8", ("fp32", "bf16"), "--int8-calibration"),
        ("tensorflow", "bf16", ("fp32", "bf16"), "runs fp32, not bf16"),
        ("onnx", "auto", ("fp32",), "expected auto or one of"),
        ("auto", "fp16", ("fp32",), "expected auto or one of"),
    ],
)
def test_impossible_choices_say_what_to_do(engine, precision, offered, message) -> None:
    with pytest.raises(engines.EngineChoiceError, match=message):
        engines.choose(engine, precision, offered, {"avx512_bf16"})


def test_int8_is_saved_from_calibration_images(tmp_path: Path, batch) -> None:
    """``save_model.py --int8-calibration DIR`` as a user runs it, in a store of its own."""
    import bentoml
    from bentoml._internal.models.model import ModelStore

    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for i, seed in enumerate(range(4)):
        rng = np.random.default_rng(seed)
        (calibration / f"{i}.jpg").write_bytes(encode(picture(320 + 10 * i, 300), "JPEG", quality=70 + i))
        (calibration / f"noise-{i}.png").write_bytes(encode(picture().rotate(90 * rng.integers(4)), "PNG"))
    (calibration / "notes.txt").write_text("not an image: skipped")
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home")}
    command = [sys.executable, "save_model.py", "--random-weights", "--int8-calibration", str(calibration)]
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    saved = bentoml.models.get("inception_v3:latest", _model_store=ModelStore(tmp_path / "home" / "models"))
    metadata = saved.info.metadata
    assert metadata["openvino_precisions"] == ["fp32", "bf16", "int8"]
    assert metadata["int8_calibration"]["images"] == 8
    assert len(metadata["int8_calibration"]["sha256"]) == 64
    answer = load(saved, "openvino", "int8")(batch)
    assert answer.shape == (len(batch), 1000)
    np.testing.assert_allclose(answer.sum(axis=1), 1, rtol=1e-2)


def test_a_model_saved_without_the_openvino_ir_is_converted_when_it_loads(
    tmp_path: Path, bento_model, batch, tensorflow_fp32, caplog: pytest.LogCaptureFixture
) -> None:
    """Models saved before the IR was stored hold the SavedModel only."""
    old = tmp_path / "old-model"
    shutil.copytree(bento_model.path, old, ignore=shutil.ignore_patterns("openvino"))
    with caplog.at_level(logging.WARNING):
        engine = engines.load(
            engines.choose("openvino", "fp32", ()), SimpleNamespace(path=str(old), tag="inception_v3:old")
        )
    assert "run save_model.py again" in caplog.text
    np.testing.assert_allclose(engine(batch), tensorflow_fp32, rtol=1e-4, atol=1e-7)


def test_without_tensorflow_a_model_saved_without_the_ir_says_to_save_it_again(
    tmp_path: Path, bento_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inception_v3.engines import openvino

    old = tmp_path / "old-model"
    shutil.copytree(bento_model.path, old, ignore=shutil.ignore_patterns("openvino"))
    monkeypatch.setattr(openvino, "installed", lambda: ("openvino",))  # as in the CPU image
    with pytest.raises(engines.EngineChoiceError, match=r"run save_model\.py again"):
        openvino.read_model(SimpleNamespace(path=str(old), tag="inception_v3:old"), "fp32")


def test_xla_compiled_batch_size_answers_as_the_plain_graph(bento_model, batch, tensorflow_fp32) -> None:
    engine = load(bento_model, "tensorflow", "fp32", xla_batch_sizes=[2])
    engine.model.compiler.join()
    assert engine.model.ready == {2}
    np.testing.assert_allclose(engine(batch[:2]), tensorflow_fp32[:2], rtol=1e-4, atol=1e-7)
    assert engine(batch[:1]).shape == (1, 1000)  # not compiled: the plain graph


def test_size_xla_cannot_compile_stays_on_the_plain_graph(caplog: pytest.LogCaptureFixture) -> None:
    import tensorflow as tf

    from inception_v3.engines.tensorflow import CompiledModel
    from inception_v3.model import PIXELS_SPEC

    class StringOps(tf.Module):
        """Ops XLA has no kernels for."""

        @tf.function(input_signature=[PIXELS_SPEC])
        def __call__(self, pixels: tf.Tensor) -> tf.Tensor:
            return tf.strings.to_number(tf.strings.as_string(pixels[:, 0, 0, 0]))

    with caplog.at_level(logging.ERROR):
        model = CompiledModel(StringOps(), [1])
        model.compiler.join()
    assert model.ready == set()
    assert "XLA could not compile batch size 1" in caplog.text
    assert model(np.full((1, 299, 299, 3), 7, np.uint8)).numpy().tolist() == [7.0]


def test_agreement_report_says_random_weights_mean_nothing(saved_model: str, tmp_path: Path, capsys) -> None:
    from benchmarks import agreement

    shutil.copy(CAT_JPEG, tmp_path / "cat.jpg")
    (tmp_path / "cat.png").write_bytes(encode(picture(), "PNG"))
    assert agreement.main(["--images", str(tmp_path)]) == 0
    report = capsys.readouterr().out
    assert "2 images" in report and "top-1 and top-5 agreement mean nothing here" in report
    fp32 = next(line for line in report.splitlines() if line.startswith("openvino fp32"))
    assert float(fp32.split()[-1]) < 1e-6
    assert "openvino int8       skipped: the model has no int8 IR" in report

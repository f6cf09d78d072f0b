"""The engines that run the model, behind one small contract.

An engine takes a batch of uint8 RGB pixels, shape (n, 299, 299, 3), and returns
(n, 1000) float32 softmax probabilities (``Engine.__call__``). Scaling to [-1, 1]
is the engine's business (inside its graph), so callers never build floats.

    tensorflow.py   the saved TensorFlow module; the engine for NVIDIA GPUs
    openvino.py     OpenVINO IR stored with the same model; the engine for CPUs

Adding an engine is adding a module with a ``load(bento_model, precision)`` and
naming it in ``ENGINES``. ``choose`` turns the configured ``engine`` and
``precision`` (``auto`` or a name) into what runs on this host, from the CPU's
flags and whether a GPU is visible; it is pure, so the API servers compute the
same answer as the runner without loading anything.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import typing as t
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if t.TYPE_CHECKING:
    import bentoml

ENGINES = ("openvino", "tensorflow")
LIBRARIES = {"openvino": "openvino", "tensorflow": "tensorflow"}  # the distribution each engine imports
PRECISIONS = ("fp32", "bf16", "int8")
# What each engine can run: TensorFlow serves fp32 only (its bf16 rewrite ran at a third
# of OpenVINO's bf16 speed; see the benchmark); int8 needs the quantized IR save_model makes.
ENGINE_PRECISIONS = {"openvino": PRECISIONS, "tensorflow": ("fp32",)}
# CPU flags (as Linux names them in /proc/cpuinfo) that make bf16 fast.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


class Engine(t.Protocol):
    name: str
    precision: str

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 299, 299, 3) uint8 RGB to (n, 1000) float32 probabilities."""
        ...


@dataclass(frozen=True)
class Choice:
    engine: str
    precision: str
    device: str  # "CPU" or "GPU"
    cpu_flags: tuple[str, ...]  # of REPORTED_FLAGS, those this CPU has

    def describe(self) -> str:
        return f"{self.engine} {self.precision} on the {self.device} ({', '.join(self.cpu_flags) or 'no AVX2'})"

    def as_dict(self) -> dict[str, t.Any]:
        """For metadata answers (JSON)."""
        return {**dataclasses.asdict(self), "cpu_flags": list(self.cpu_flags)}


class EngineChoiceError(ValueError):
    """The configuration asks for something this model or host cannot run."""


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so auto precision stays fp32
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@functools.cache
def gpu_visible() -> bool:
    """An NVIDIA GPU BentoML would hand the runner (nvidia-ml-py, as BentoML's scheduler uses)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return pynvml.nvmlDeviceGetCount() > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: no GPU
        return False


@functools.cache
def installed() -> tuple[str, ...]:
    """The engines whose library is installed here (the CPU image carries no TensorFlow)."""
    found = []
    for name in ENGINES:
        try:
            importlib.metadata.version(LIBRARIES[name])
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return tuple(found)


def engine_name(engine: str, gpu: bool, available: t.Collection[str]) -> str:
    """What an ``engine`` setting means: ``auto`` is TensorFlow on an NVIDIA GPU (where installed), else OpenVINO."""
    return engine if engine != "auto" else ("tensorflow" if gpu and "tensorflow" in available else "openvino")


def engine_here(engine: str) -> str:
    return engine_name(engine, gpu_visible(), installed())


def choose(
    engine: str,
    precision: str,
    offered: t.Collection[str],
    flags: t.Collection[str] = (),
    gpu: bool = False,
    available: t.Collection[str] = ENGINES,
) -> Choice:
    """What runs here. ``offered``: the precisions the saved model carries for OpenVINO;
    ``available``: the engines installed.

    ``auto`` engine: see ``engine_name``. ``auto`` precision:
    bf16 where the CPU has AMX-BF16 or AVX512_BF16 (OpenVINO), fp32 otherwise. int8 is
    never automatic: it changes answers, so it is asked for by name.
    """
    if engine not in ("auto", *ENGINES):
        raise EngineChoiceError(f"engine {engine!r}: expected auto or one of {', '.join(ENGINES)}")
    if precision not in ("auto", *PRECISIONS):
        raise EngineChoiceError(f"precision {precision!r}: expected auto or one of {', '.join(PRECISIONS)}")
    name = engine_name(engine, gpu, available)
    if name not in available:
        raise EngineChoiceError(
            f"the {name} engine needs the {LIBRARIES[name]} package, which is not installed here "
            "(the CPU container image carries no TensorFlow): set engine to auto or openvino, "
            "or serve where requirements-tensorflow.txt is installed"
        )
    if precision == "auto":
        precision = "bf16" if name == "openvino" and any(flag in flags for flag in BF16_FLAGS) else "fp32"
    if precision not in ENGINE_PRECISIONS[name]:
        raise EngineChoiceError(f"the {name} engine runs {', '.join(ENGINE_PRECISIONS[name])}, not {precision}")
    if name == "openvino" and precision == "int8" and "int8" not in offered:
        raise EngineChoiceError(
            "this model has no int8 version: save it with `save_model.py --int8-calibration DIR` "
            "(a folder of images like the traffic), or set precision to auto, fp32 or bf16"
        )
    return Choice(
        engine=name,
        precision=precision,
        device="GPU" if name == "tensorflow" and gpu else "CPU",
        cpu_flags=tuple(flag for flag in REPORTED_FLAGS if flag in flags),
    )


def choose_here(engine: str, precision: str, bento_model: bentoml.Model) -> Choice:
    offered = bento_model.info.metadata.get("openvino_precisions", ())
    return choose(engine, precision, offered, cpu_flags(), gpu_visible(), installed())


def load(choice: Choice, bento_model: bentoml.Model, **options: t.Any) -> Engine:
    module = importlib.import_module(f"{__name__}.{choice.engine}")
    return module.load(bento_model, choice.precision, **options)

"""The one protocol-neutral entry every door calls: image files in, probabilities and labels out.

As KServe's data plane is for its protocols: BentoML's APIs, TensorFlow Serving's
REST and gRPC doors and any other door take a request apart, and call this for the
work they share: the per-request image limit, decoding (``preprocessing``), the
runner (one batching queue for all doors), labels and top-k, and what the model is
(its versions, weights, and the engine that runs it here).
"""

from __future__ import annotations

import asyncio
import dataclasses
import typing as t
from dataclasses import dataclass

import bentoml
import numpy as np

from . import engines, weights
from .api import Prediction, requested_top_k, to_prediction
from .availability import runner_reachable
from .errors import InvalidImage
from .preprocessing import read_image
from .settings import Settings


@dataclass
class Classifier:
    runner: bentoml.legacy.Runner
    bento_model: bentoml.Model
    settings: Settings

    def __post_init__(self) -> None:
        self.class_names: list[str] = self.bento_model.custom_objects["class_names"]
        self.version: int = self.bento_model.info.metadata["serving_version"]
        self.weights: str = weights.kind(self.bento_model.info.metadata)
        self.warning: str | None = weights.warning(self.bento_model.info.metadata)
        # The runner loads the same choice; it is pure, so it needs no call to the runner.
        self.engine = engines.choose_here(self.settings.engine, self.settings.precision, self.bento_model)

    def engine_info(self) -> dict[str, t.Any]:
        """What runs the model here, for the doors' metadata answers."""
        return {**dataclasses.asdict(self.engine), "cpu_flags": list(self.engine.cpu_flags)}

    def check_count(self, count: int) -> None:
        if count > self.settings.max_images_per_request:
            raise InvalidImage(f"{count} images in one request; the limit is {self.settings.max_images_per_request}")

    async def classify(self, images: list[np.ndarray]) -> np.ndarray:
        """(n, 1000) probabilities for decoded images; they share one runner batch."""
        self.check_count(len(images))
        async with runner_reachable():
            return await self.runner.classify.async_run(np.stack(images))

    async def classify_files(self, files: list[bytes]) -> np.ndarray:
        self.check_count(len(files))  # before decoding any of them
        return await self.classify(list(await asyncio.gather(*(self.read(data) for data in files))))

    async def read(self, data: bytes) -> np.ndarray:
        return await read_image(data, self.settings.pixel_limits)

    def predictions(self, probabilities: np.ndarray, k: int | None = None) -> list[Prediction]:
        k = k or requested_top_k.get() or self.settings.default_top_k
        return [to_prediction(row, self.class_names, k, self.warning) for row in probabilities]

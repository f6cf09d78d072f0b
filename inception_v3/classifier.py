"""The one protocol-neutral entry every door calls: image files in, probabilities and labels out.

As KServe's data plane is for its protocols: BentoML's APIs, TensorFlow Serving's
REST and gRPC doors and any other door take a request apart, and call this for the
work they share: the per-request image limit, decoding (``preprocessing``), the
runner (a batching queue: shared by all doors, or one per API server when embedded),
the version asked for (``versions``: the runner holds the versions and answers with
the one that classified), labels and top-k, and what the model is (its versions, their states, weights and engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import typing as t
from collections.abc import AsyncIterator
from dataclasses import dataclass

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException

from . import versions, weights
from .api import Prediction, requested_top_k, requested_version, to_prediction
from .availability import runner_reachable
from .errors import InvalidImage, ModelNotFound, UnsupportedMediaType
from .preprocessing import read_image
from .settings import Settings


@dataclass(frozen=True)
class Classified:
    probabilities: np.ndarray  # (n, 1000)
    version: int  # the version that answered
    warning: str | None  # set when that version's labels are not to be trusted (random weights)


@dataclass
class Classifier:
    runner: bentoml.legacy.Runner
    bento_model: bentoml.Model
    settings: Settings

    def __post_init__(self) -> None:
        self.name: str = self.bento_model.tag.name
        self.class_names: list[str] = self.bento_model.custom_objects["class_names"]
        self.warning: str | None = weights.warning(self.bento_model.info.metadata)  # the model at start
        self.warnings: dict[int, str | None] = {}  # by version, as the runner said

    def check_count(self, count: int) -> None:
        if count > self.settings.max_images_per_request:
            raise InvalidImage(f"{count} images in one request; the limit is {self.settings.max_images_per_request}")

    async def classify(self, images: list[np.ndarray], version: int | None = None) -> Classified:
        """Probabilities for decoded images; they share one runner batch.

        ``version``: the one to answer (default: the ``?version=`` the request carries,
        else the newest available); one that is not available is a 404.
        """
        self.check_count(len(images))
        if version is None:
            version = requested_version.get()
        if version is not None and not versions.is_number(version):
            raise self.not_available(version)
        async with runner_reachable():
            probabilities, answered = await self.runner.classify.async_run(
                np.stack(images), versions.requested(len(images), version)
            )
        number = int(answered[0])
        if number == versions.NOT_SERVED:
            raise self.not_available(version)
        if number not in self.warnings:
            await self.model_status()
        return Classified(probabilities, number, self.warnings.get(number))

    async def classify_files(self, files: list[bytes], version: int | None = None) -> Classified:
        self.check_count(len(files))  # before decoding any of them
        return await self.classify(list(await asyncio.gather(*(self.read(data) for data in files))), version)

    async def classify_tensor_elements(self, elements: list[bytes], version: int | None = None) -> Classified:
        """The tensor doors' images. One in a format not served is a bad tensor (400,
        INVALID_ARGUMENT), not a 415: the request's own media type was right."""
        try:
            return await self.classify_files(elements, version)
        except UnsupportedMediaType as error:
            raise InvalidImage(error.message) from None

    async def read(self, data: bytes) -> np.ndarray:
        return await read_image(data, self.settings.decode_limits)

    async def model_status(self) -> list[dict[str, t.Any]]:
        """Every version the runner knows, newest first: number, state, error, tag, metadata, engine."""
        async with runner_reachable():
            statuses = await self.runner.model_status.async_run()
        self.warnings.update({s["version"]: weights.warning(s["metadata"]) for s in statuses})
        return statuses

    @contextlib.asynccontextmanager
    async def versioned(
        self, version: int | None, not_found: t.Callable[[int | None], ModelNotFound]
    ) -> AsyncIterator[None]:
        """Around a door's handling of a request for ``version``: a version not served is
        ``not_found(version)`` (each protocol words it its own way) and, as TF Serving has
        it, wins over whatever else is wrong with the request. That is asked of the runner
        only once something else failed: a good request costs no call more."""
        try:
            yield
        except ModelNotFound:
            raise not_found(version) from None
        except BentoMLException:
            if version is not None:
                try:
                    await self.available(version)
                except ModelNotFound:
                    raise not_found(version) from None
            raise

    async def available_versions(self) -> list[dict[str, t.Any]]:
        """The statuses of the versions that answer requests, newest first."""
        return [s for s in await self.model_status() if s["state"] == versions.State.AVAILABLE.value]

    async def available(self, version: int | None = None) -> dict[str, t.Any]:
        """The status of ``version`` (default: the newest available), if it is available; else 404."""
        return self.pick(await self.available_versions(), version)

    def pick(self, available: list[dict[str, t.Any]], version: int | None) -> dict[str, t.Any]:
        for status in available:
            if version is None or status["version"] == version:
                return status
        raise self.not_available(version)

    def not_available(self, version: int | None) -> ModelNotFound:
        return ModelNotFound(f"version {version} of {self.name} is not available")

    def predictions(self, classified: Classified, k: int | None = None) -> list[Prediction]:
        k = k or requested_top_k.get() or self.settings.default_top_k
        return [
            to_prediction(row, self.class_names, k, classified.version, classified.warning)
            for row in classified.probabilities
        ]

"""Inception v3 as a BentoML service: image in, label out, over HTTP and gRPC.

    bentoml serve service:svc        # HTTP (BentoML APIs, Swagger UI, TF Serving REST)
    bentoml serve-grpc service:svc   # gRPC (BentoML APIs, TF Serving PredictionService)

The API workers read each image's header: plain JPEG files go to the runner as
they are and are decoded inside its TensorFlow graph; other images are decoded
and resized by the API workers. The runner batches concurrent requests for the
model (BentoML adaptive batching; ``inception_v3/batching.py`` decides when a
batch leaves). gRPC serving exists only for BentoML's
legacy Service API, hence ``bentoml.legacy``.
"""

from __future__ import annotations

import asyncio

import bentoml
import numpy as np
from bentoml.io import JSON

from inception_v3 import batching, client_schema, grpc_metrics, guards, openapi, tfserving
from inception_v3.api import (
    BatchPrediction,
    BatchRequest,
    ImageUpload,
    JsonInput,
    Prediction,
    decode_base64_image,
    requested_top_k,
    to_prediction,
)
from inception_v3.errors import InvalidImage
from inception_v3.preprocessing import ModelInput, read_model_input
from inception_v3.runner import InceptionV3Runnable, classify_inputs, connect_without_environment, failed
from inception_v3.settings import SERVICE_NAME, load_settings, use_project_config_by_default

use_project_config_by_default()
settings = load_settings()
bento_model = bentoml.models.get(settings.model_tag)
class_names: list[str] = bento_model.custom_objects["class_names"]

batching.install(settings.batch_patience)
connect_without_environment()
runner = bentoml.legacy.Runner(
    InceptionV3Runnable,
    name=SERVICE_NAME,
    models=[bento_model],
    runnable_init_params={"bento_model": bento_model, "xla_batch_sizes": settings.xla_batch_sizes},
)
svc = bentoml.legacy.Service(SERVICE_NAME, runners=[runner])


async def classify(items: list[ModelInput]) -> np.ndarray:
    """Probabilities for every image of a request; every door (BentoML, TF Serving) comes here."""
    if len(items) > settings.max_images_per_request:
        raise InvalidImage(f"{len(items)} images in one request; the limit is {settings.max_images_per_request}")
    probabilities = await classify_inputs(runner, items)
    if failed(probabilities).any():
        raise InvalidImage("corrupt or truncated JPEG image: it could not be decoded")
    return probabilities


async def classify_files(files: list[bytes]) -> np.ndarray:
    return await classify(await asyncio.gather(*(read_model_input(data, settings.max_image_pixels) for data in files)))


def predictions(probabilities: np.ndarray, k: int | None) -> list[Prediction]:
    k = k or requested_top_k.get() or settings.default_top_k
    return [to_prediction(row, class_names, k) for row in probabilities]


@svc.api(
    input=ImageUpload(max_pixels=settings.max_image_pixels),
    output=JSON(pydantic_model=Prediction),
    route="predict",
)
async def predict(image: ModelInput) -> Prediction:
    """Classify one image (JPEG, PNG, WebP, BMP or GIF). `?top_k=N` sets how many classes come back."""
    (prediction,) = predictions(await classify([image]), None)
    return prediction


@svc.api(
    input=JsonInput(pydantic_model=BatchRequest),
    output=JSON(pydantic_model=BatchPrediction),
    route="predict_batch",
)
async def predict_batch(request: BatchRequest) -> BatchPrediction:
    """Classify several base64-encoded images in one request; they share one runner batch."""
    probabilities = await classify_files([decode_base64_image(text) for text in request.images])
    return BatchPrediction(predictions=predictions(probabilities, request.top_k))


grpc_metrics.install()
guards.install(svc, settings)
openapi.install(svc, bento_model)
client_schema.install(svc)
tfserving.install(svc, classify_files, bento_model, class_names)

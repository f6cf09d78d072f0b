"""Inception v3 as a BentoML service: image in, label out, over HTTP and gRPC.

    bentoml serve service:svc        # HTTP (BentoML APIs, Swagger UI, TF Serving and Open Inference REST)
    bentoml serve-grpc service:svc   # gRPC (BentoML APIs, TF Serving and Open Inference services)

The API workers decode and resize each image (``preprocessing``); the runner
batches concurrent requests (BentoML adaptive batching; ``inception_v3/batching.py``
decides when a batch leaves) for the engine this host runs best
(``inception_v3/engines``: OpenVINO on CPUs, TensorFlow on a GPU). ``runner: auto``
embeds OpenVINO in each API server, which batches its own requests, and shares one
runner process among the doors for TensorFlow (``settings.Settings.embedded_runner``).
gRPC serving exists only for BentoML's legacy Service API, hence ``bentoml.legacy``.
"""

from __future__ import annotations

import bentoml
import numpy as np

from inception_v3 import batching, client_schema, grpc_metrics, guards, openapi, protocols, versions
from inception_v3.api import BatchPrediction, BatchRequest, ImageUpload, JsonInput, Prediction, decode_base64_image
from inception_v3.classifier import Classifier
from inception_v3.legacy import JSON
from inception_v3.runner import InceptionV3Runnable, connect_without_environment, runnable_init_params
from inception_v3.settings import SERVICE_NAME, load_settings, use_project_config_by_default

use_project_config_by_default()
settings = load_settings()
bento_model = versions.model_store(settings.model_store).get(settings.model_tag)

batching.install(settings.batch_patience, settings.embedded_batch_patience)
connect_without_environment()
runner = bentoml.legacy.Runner(
    InceptionV3Runnable,
    name=SERVICE_NAME,
    embedded=settings.embedded_runner,
    models=[bento_model],
    runnable_init_params=runnable_init_params(bento_model, settings, watch=True),
)
svc = bentoml.legacy.Service(SERVICE_NAME, runners=[runner])
classifier = Classifier(runner, bento_model, settings)


@svc.api(
    input=ImageUpload(settings.decode_limits),
    output=JSON(pydantic_model=Prediction),
    route="predict",
)
async def predict(image: np.ndarray) -> Prediction:
    """Classify one image (JPEG, PNG, WebP, BMP or GIF). `?top_k=N` sets how many classes come back,
    `?version=N` which model version answers (default: the newest)."""
    (prediction,) = classifier.predictions(await classifier.classify([image]))
    return prediction


@svc.api(
    input=JsonInput(pydantic_model=BatchRequest),
    output=JSON(pydantic_model=BatchPrediction),
    route="predict_batch",
)
async def predict_batch(request: BatchRequest) -> BatchPrediction:
    """Classify several base64-encoded images in one request; they share one runner batch."""
    files = [decode_base64_image(text) for text in request.images]
    classified = await classifier.classify_files(files, request.version)
    return BatchPrediction(predictions=classifier.predictions(classified, request.top_k))


grpc_metrics.install()
guards.install(svc, settings, ready_note=classifier.warning)
protocols.install(svc, classifier)
openapi.install(svc, bento_model)
client_schema.install(svc)

"""Schemathesis against the running HTTP server's own OpenAPI document: for data
the schema allows and data it does not, no answer is a 5xx, every status is one
the document lists, and every body matches its documented schema. The document
holds every door's routes: BentoML's APIs, TensorFlow Serving's (``/v1``) and the
Open Inference Protocol's (``/v2``).

Schemathesis' pytest plugin (``@schema.parametrize``) fails under pytest 9
(``'Function' object has no attribute '_nodeid'``), so each operation's
Hypothesis strategy is run here directly."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

pytestmark = pytest.mark.servers

OPERATIONS = [
    ("GET", "/healthz"),
    ("GET", "/livez"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/predict"),
    ("POST", "/predict_batch"),
    *(
        (method, prefix + suffix)
        for prefix in ("/v1/models/{model_name}", "/v1/models/{model_name}/versions/{version}")
        for method, suffix in (("POST", ":predict"), ("GET", "/metadata"), ("GET", ""))
    ),
    ("GET", "/v2"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    *(
        (method, prefix + suffix)
        for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}")
        for method, suffix in (("GET", ""), ("GET", "/ready"), ("POST", "/infer"))
    ),
]


@pytest.fixture(scope="module")
def served_schema(http_address: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"http://{http_address}/docs.json")


def test_document_lists_the_services_operations(served_schema: schemathesis.BaseSchema) -> None:
    listed = {(result.ok().method.upper(), result.ok().path) for result in served_schema.get_all_operations()}
    assert listed == set(OPERATIONS)


CASES = [(method, path, GenerationMode.POSITIVE) for method, path in OPERATIONS] + [
    # Only what takes a body can break the schema.
    (method, path, GenerationMode.NEGATIVE)
    for method, path in OPERATIONS
    if method == "POST"
]


@pytest.mark.parametrize(("method", "path", "mode"), CASES)
def test_operation_conforms_to_the_document(
    served_schema: schemathesis.BaseSchema, method: str, path: str, mode: GenerationMode
) -> None:
    check_conformance(served_schema, method, path, mode)


def check_conformance(
    schema: schemathesis.BaseSchema,
    method: str,
    path: str,
    mode: GenerationMode,
    max_examples: int = 40,
    headers: dict[str, str] | None = None,
) -> None:
    """Hypothesis' cases for one operation, sent with ``headers``: no 5xx, statuses and bodies as documented."""
    operation = schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=max_examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def conforms(case: schemathesis.Case) -> None:
        # /predict documents its body as any bytes of an image type, /infer base64 images;
        # random data is not an image and is rightly refused (415, 400): that check does not apply.
        case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance], timeout=120)

    conforms()

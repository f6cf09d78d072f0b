"""Client errors with the HTTP status they deserve, and their gRPC twins.

BentoML answers a ``BentoMLException`` with its ``error_code`` over HTTP and maps
that code to a gRPC status. Its map knows 400, 404, 422, 429 and 503 but sends
413 and 415 to UNKNOWN, so ``register_grpc_status_codes`` completes it.
"""

from __future__ import annotations

from http import HTTPStatus

from bentoml.exceptions import BadInput, BentoMLException


class InvalidImage(BadInput):
    """400: empty, corrupt or truncated image data."""


class UnsupportedMediaType(BentoMLException):
    error_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class PayloadTooLarge(BentoMLException):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class ModelNotFound(BentoMLException):
    error_code = HTTPStatus.NOT_FOUND


class Unauthenticated(BentoMLException):
    error_code = HTTPStatus.UNAUTHORIZED


class MethodNotAllowed(BentoMLException):
    error_code = HTTPStatus.METHOD_NOT_ALLOWED


def register_grpc_status_codes() -> None:
    import grpc
    from bentoml.grpc.utils import http_status_to_grpc_status_map

    # The map is built once and cached, so adding to it reaches every caller.
    codes = http_status_to_grpc_status_map()
    codes[HTTPStatus.REQUEST_ENTITY_TOO_LARGE] = grpc.StatusCode.RESOURCE_EXHAUSTED
    codes[HTTPStatus.UNSUPPORTED_MEDIA_TYPE] = grpc.StatusCode.INVALID_ARGUMENT
    codes[HTTPStatus.UNPROCESSABLE_ENTITY] = grpc.StatusCode.INVALID_ARGUMENT
    codes[HTTPStatus.TOO_MANY_REQUESTS] = grpc.StatusCode.RESOURCE_EXHAUSTED
    codes[HTTPStatus.NOT_FOUND] = grpc.StatusCode.NOT_FOUND

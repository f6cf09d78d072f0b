"""Classify an image with the Inception v3 service, the reference client's way.

    python -m client.request_inception_v3 --image_file ./cat.jpg --format grpc   # or rest
    python -m client.request_inception_v3 --metadata [--format rest]

REST posts to ``/predict_batch`` (the file as base64 JSON like the reference's
REST request), gRPC goes through
BentoML's gRPC protocol (``bentoml.grpc.v1.BentoService/Call``). It prints the
label; ``--top_k N`` prints N labels with their scores. ``--metadata`` prints
TF Serving's model metadata, the same JSON over either protocol (gRPC
``PredictionService/GetModelMetadata``, REST ``/v1/models/inception_v3/metadata``).
Errors are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from inception_v3.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from inception_v3.labels import NUM_CLASSES
from inception_v3.preprocessing import open_image
from inception_v3.settings import load_settings
from inception_v3.tls import ClientTls, grpc_channel, http_url

MODEL_NAME = "inception_v3"
API_KEY_ENV = "INCEPTION_V3_API_KEY"


def classify_rest(
    image: bytes,
    target: str,
    port: int,
    timeout_s: float,
    top_k: int | None,
    api_key: str | None = None,
    tls: ClientTls | None = None,
) -> dict[str, Any]:
    # The file goes as base64 JSON to `predict_batch`, as the reference's REST client
    # sends it, so the server sees the bytes gRPC and TF Serving clients send.
    request = {"images": [base64.b64encode(image).decode("ascii")], "top_k": top_k}
    (prediction,) = rest_call("POST", "/predict_batch", target, port, timeout_s, api_key, tls, request)["predictions"]
    return prediction


def classify_grpc(
    image: bytes,
    target: str,
    port: int,
    timeout_s: float,
    top_k: int | None,
    api_key: str | None = None,
    tls: ClientTls | None = None,
) -> dict[str, Any]:
    import grpc
    from bentoml.grpc.v1 import service_pb2, service_pb2_grpc
    from google.protobuf.json_format import MessageToDict

    # BentoML's own gRPC client classes are broken in 1.4 (issue 4683); its stub works.
    with grpc_channel(f"{target}:{port}", tls) as channel:
        request = service_pb2.Request(api_name="predict", file=service_pb2.File(kind="image/jpeg", content=image))
        metadata = [("top_k", str(top_k))] if top_k else []
        metadata += [(name.lower(), value) for name, value in authorization(api_key).items()]
        try:
            response = service_pb2_grpc.BentoServiceStub(channel).Call(request, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as error:
            raise ServiceError(f"gRPC {error.code().name}: {error.details()}") from None
    return MessageToDict(response.json)


def metadata_rest(
    target: str, port: int, timeout_s: float, api_key: str | None = None, tls: ClientTls | None = None
) -> dict[str, Any]:
    return rest_call("GET", f"/v1/models/{MODEL_NAME}/metadata", target, port, timeout_s, api_key, tls)


def rest_call(
    method: str,
    path: str,
    target: str,
    port: int,
    timeout_s: float,
    api_key: str | None,
    tls: ClientTls | None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    import httpx

    response = httpx.request(
        method,
        http_url(f"{target}:{port}", tls) + path,
        json=body,
        headers=authorization(api_key),
        timeout=timeout_s,
        verify=tls.ssl_context() if tls else True,
    )
    if response.status_code != 200:
        raise ServiceError(f"HTTP {response.status_code}: {error_message(response.text)}")
    return response.json()


def metadata_grpc(
    target: str, port: int, timeout_s: float, api_key: str | None = None, tls: ClientTls | None = None
) -> dict[str, Any]:
    """TF Serving's ``GetModelMetadata``, as the same JSON ``metadata_rest`` prints."""
    import grpc
    from google.protobuf import json_format, struct_pb2, wrappers_pb2

    from inception_v3.protocols.tfserving import pb, proto_to_json

    request = pb.get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = MODEL_NAME
    metadata = [(name.lower(), value) for name, value in authorization(api_key).items()]
    with grpc_channel(f"{target}:{port}", tls) as channel:
        stub = pb.prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.GetModelMetadata(request, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as error:
            raise ServiceError(f"gRPC {error.code().name}: {error.details()}") from None
    signature_defs, weights, engine = (
        pb.get_model_metadata_pb2.SignatureDefMap(),
        wrappers_pb2.StringValue(),
        struct_pb2.Struct(),
    )
    response.metadata["signature_def"].Unpack(signature_defs)
    response.metadata["weights"].Unpack(weights)
    response.metadata["engine"].Unpack(engine)
    return {
        "model_spec": proto_to_json(response.model_spec),
        "metadata": {
            "signature_def": proto_to_json(signature_defs),
            "weights": weights.value,
            "engine": json_format.MessageToDict(engine),
        },
    }


class ServiceError(Exception):
    pass


def authorization(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def error_message(body: str) -> str:
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body.strip()[:200]


def class_count(text: str) -> int:
    """What the server takes as ``top_k``: 1 to the number of classes."""
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= NUM_CLASSES):
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {NUM_CLASSES}, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--format",
        "-f",
        default="grpc",
        type=str.lower,
        choices=["grpc", "rest"],
        help="GRPC or REST request (default grpc)",
    )
    parser.add_argument("--image_file", "-i", default="./cat.jpg", type=Path, help="input image file path")
    parser.add_argument("--target", "-t", default="localhost", help="target address")
    parser.add_argument("--port", "-p", type=int, help="server port (default: 8500 for gRPC, 8501 for REST)")
    parser.add_argument("--timeout_second", "-s", default=5, type=float, help="timeout in seconds")
    parser.add_argument("--top_k", "-k", type=class_count, help="print the k best labels with their scores")
    parser.add_argument("--metadata", action="store_true", help="print the model's TF Serving metadata")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (the server's api_server.ssl is set)")
    parser.add_argument("--ca-cert", type=Path, help="with --tls: the CA that signed the server's certificate")
    parser.add_argument("--cert", type=Path, help="with --tls: this client's certificate, for mutual TLS")
    parser.add_argument("--key", type=Path, help="with --tls: this client's private key, for mutual TLS")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"the server's API key, if it asks for one (default: ${API_KEY_ENV})",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings()
    port = args.port or (settings.grpc_port if args.format == "grpc" else settings.http_port)
    tls = ClientTls(args.ca_cert, args.cert, args.key) if args.tls else None
    warnings.filterwarnings("ignore")
    logging.getLogger("bentoml").setLevel(logging.ERROR)
    try:
        if args.metadata:
            metadata = metadata_grpc if args.format == "grpc" else metadata_rest
            print(json.dumps(metadata(args.target, port, args.timeout_second, args.api_key, tls), indent=2))
            return 0
        image = args.image_file.read_bytes()
        open_image(image)  # the service's own checks, before anything is sent
        classify = classify_grpc if args.format == "grpc" else classify_rest
        prediction = classify(image, args.target, port, args.timeout_second, args.top_k, args.api_key, tls)
    except OSError as error:
        print(f"error: {error.strerror or error}: {getattr(error, 'filename', '') or args.image_file}", file=sys.stderr)
        return 2
    except (ServiceError, InvalidImage, UnsupportedMediaType, PayloadTooLarge) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # connection refused, timeouts: one line, not a traceback
        print(f"error: cannot reach {args.format} server at {args.target}:{port}: {error}", file=sys.stderr)
        return 1
    if prediction.get("warning"):
        print(f"warning: {prediction['warning']}", file=sys.stderr)
    if args.top_k:
        for entry in prediction["top_k"]:
            print(f"{entry['label']}\t{entry['score']:.4f}")
    else:
        print(prediction["label"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

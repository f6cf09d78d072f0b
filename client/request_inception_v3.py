"""Classify an image with the Inception v3 service, the reference client's way.

    python -m client.request_inception_v3 --image_file ./cat.jpg --format grpc   # or rest
    python -m client.request_inception_v3 --metadata [--format rest]

REST goes through BentoML's Python HTTP client (``/predict_batch``, the file as
base64 JSON like the reference's REST request), gRPC through
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
import sys
import warnings
from pathlib import Path
from typing import Any

from inception_v3.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from inception_v3.preprocessing import open_image
from inception_v3.settings import load_settings

MODEL_NAME = "inception_v3"


def classify_rest(image: bytes, target: str, port: int, timeout_s: float, top_k: int | None) -> dict[str, Any]:
    from bentoml.client import SyncHTTPClient
    from bentoml.exceptions import BentoMLException

    # The file goes as base64 JSON to `predict_batch`, as the reference's REST client
    # sends it: BentoML's client would re-encode an image given to `predict`, so the
    # server would not see the bytes gRPC and TF Serving clients send.
    request = {"images": [base64.b64encode(image).decode("ascii")], "top_k": top_k}
    with SyncHTTPClient.from_url(f"http://{target}:{port}") as http_client:
        http_client.client.timeout = timeout_s
        try:
            (prediction,) = http_client.call("predict_batch", request)["predictions"]
        except BentoMLException as error:  # "Error making request: 400: b'{...}'"
            status, _, body = str(error).removeprefix("Error making request: ").partition(": ")
            raise ServiceError(f"HTTP {status}: {error_message(body.removeprefix('b').strip(chr(39)))}") from None
    return prediction


def classify_grpc(image: bytes, target: str, port: int, timeout_s: float, top_k: int | None) -> dict[str, Any]:
    import grpc
    from bentoml.grpc.v1 import service_pb2, service_pb2_grpc
    from google.protobuf.json_format import MessageToDict

    # BentoML's own gRPC client classes are broken in 1.4 (issue 4683); its stub works.
    with grpc.insecure_channel(f"{target}:{port}") as channel:
        request = service_pb2.Request(api_name="predict", file=service_pb2.File(kind="image/jpeg", content=image))
        metadata = [("top_k", str(top_k))] if top_k else None
        try:
            response = service_pb2_grpc.BentoServiceStub(channel).Call(request, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as error:
            raise ServiceError(f"gRPC {error.code().name}: {error.details()}") from None
    return MessageToDict(response.json)


def metadata_rest(target: str, port: int, timeout_s: float) -> dict[str, Any]:
    import httpx

    response = httpx.get(f"http://{target}:{port}/v1/models/{MODEL_NAME}/metadata", timeout=timeout_s)
    if response.status_code != 200:
        raise ServiceError(f"HTTP {response.status_code}: {error_message(response.text)}")
    return response.json()


def metadata_grpc(target: str, port: int, timeout_s: float) -> dict[str, Any]:
    import grpc

    from inception_v3.tfserving import pb, proto_to_json

    request = pb.get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = MODEL_NAME
    with grpc.insecure_channel(f"{target}:{port}") as channel:
        stub = pb.prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.GetModelMetadata(request, timeout=timeout_s)
        except grpc.RpcError as error:
            raise ServiceError(f"gRPC {error.code().name}: {error.details()}") from None
    signature_defs = pb.get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_defs)
    return {
        "model_spec": proto_to_json(response.model_spec),
        "metadata": {"signature_def": proto_to_json(signature_defs)},
    }


class ServiceError(Exception):
    pass


def error_message(body: str) -> str:
    try:
        return json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return body.strip()[:200]


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
    parser.add_argument("--top_k", "-k", type=int, help="print the k best labels with their scores")
    parser.add_argument("--metadata", action="store_true", help="print the model's TF Serving metadata")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = load_settings()
    port = args.port or (settings.grpc_port if args.format == "grpc" else settings.http_port)
    warnings.filterwarnings("ignore")
    logging.getLogger("bentoml").setLevel(logging.ERROR)
    try:
        if args.metadata:
            metadata = metadata_grpc if args.format == "grpc" else metadata_rest
            print(json.dumps(metadata(args.target, port, args.timeout_second), indent=2))
            return 0
        image = args.image_file.read_bytes()
        open_image(image)  # the service's own checks, before anything is sent
        classify = classify_grpc if args.format == "grpc" else classify_rest
        prediction = classify(image, args.target, port, args.timeout_second, args.top_k)
    except OSError as error:
        print(f"error: {error.strerror or error}: {getattr(error, 'filename', '') or args.image_file}", file=sys.stderr)
        return 2
    except (ServiceError, InvalidImage, UnsupportedMediaType, PayloadTooLarge) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # connection refused, timeouts: one line, not a traceback
        print(f"error: cannot reach {args.format} server at {args.target}:{port}: {error}", file=sys.stderr)
        return 1
    if args.top_k:
        for entry in prediction["top_k"]:
            print(f"{entry['label']}\t{entry['score']:.4f}")
    else:
        print(prediction["label"])
    return 0


if __name__ == "__main__":
    sys.exit(main())

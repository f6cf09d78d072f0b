"""Fuzzing the decode path: whatever bytes arrive, ``prepare_image`` returns the
model's (299, 299, 3) uint8 input or raises one of the service's client errors
(400, 413, 415), never anything else; a 500 or a crashed worker would follow.
The Open Inference door's request parsing (REST JSON and binary, gRPC messages)
is fuzzed the same way: image files or a 400, nothing else."""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
from bentoml.exceptions import BadInput
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from inception_v3.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from inception_v3.preprocessing import INPUT_SIZE, DecodeLimits, prepare_image
from inception_v3.protocols import kserve_v2
from tests.images import valid_samples

CLIENT_ERRORS = (InvalidImage, PayloadTooLarge, UnsupportedMediaType)
# Small, so that headers mutated to declare large images are refused before any
# big allocation; the path is the same for any limit.
LIMITS = DecodeLimits(max_image_pixels=1_000_000, max_jpeg_pixels=4_000_000)
SEEDS = valid_samples()
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid image of one of the service's formats, then truncated, overwritten or spliced."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "overwrite", "insert", "delete", "header"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "truncate":
            del data[position:]
        elif kind == "overwrite":
            patch = draw(st.binary(min_size=1, max_size=8))
            data[position : position + len(patch)] = patch
        elif kind == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete":
            del data[position : position + draw(st.integers(1, 64))]
        else:  # headers hold sizes, modes and offsets: hit them often
            header_position = draw(st.integers(0, min(len(data), 64)))
            data[header_position : header_position + 1] = draw(st.binary(min_size=1, max_size=1))
    return bytes(data)


def check(data: bytes) -> None:
    try:
        pixels = prepare_image(data, LIMITS)
    except CLIENT_ERRORS:
        return
    assert pixels.shape == (INPUT_SIZE, INPUT_SIZE, 3)
    assert pixels.dtype == np.uint8


@FUZZ
@given(st.binary(max_size=4096))
def test_any_bytes(data: bytes) -> None:
    check(data)


@FUZZ
@given(
    st.binary(max_size=512).map(lambda tail: b"\x89PNG\r\n\x1a\n" + tail) | st.binary().map(lambda t: b"\xff\xd8" + t)
)
def test_bytes_behind_a_signature(data: bytes) -> None:
    check(data)


@FUZZ
@given(mutated_images())
def test_mutated_images(data: bytes) -> None:
    check(data)


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_truncation_point_of_a_seed(name: str) -> None:
    """Deterministic: each seed cut at 32 evenly spaced points."""
    data = SEEDS[name]
    for end in np.linspace(0, len(data) - 1, 32, dtype=int):
        check(data[:end])


# --- the Open Inference door's requests ------------------------------------------

JPEG = SEEDS[sorted(SEEDS)[0]]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ELEMENTS = st.sampled_from([base64.b64encode(JPEG).decode(), "aGk=", {"b64": "aGk="}, "%%%"]) | JSON_VALUES
TENSORS = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["image", "pixels"]) | JSON_VALUES,
        "datatype": st.sampled_from(["BYTES", "FP32"]) | JSON_VALUES,
        "shape": st.lists(st.integers(-1, 3), max_size=2) | JSON_VALUES,
        "data": st.lists(ELEMENTS, max_size=3) | JSON_VALUES,
    },
    optional={"parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-1, 80) | JSON_VALUES})},
)
OUTPUTS = st.fixed_dictionaries(
    {"name": st.sampled_from(["label", "probabilities", "logits"]) | JSON_VALUES},
    optional={
        "parameters": st.fixed_dictionaries(
            {},
            optional={"classification": st.integers(-1, 2000) | JSON_VALUES, "binary_data": JSON_VALUES},
        )
        | JSON_VALUES
    },
)
BODIES = (
    st.fixed_dictionaries(
        {"inputs": st.lists(TENSORS, max_size=2) | JSON_VALUES},
        optional={"outputs": st.lists(OUTPUTS, max_size=3) | JSON_VALUES, "parameters": JSON_VALUES},
    )
    | JSON_VALUES
)


def bytes_elements(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


@FUZZ
@given(st.binary(max_size=64) | st.lists(st.binary(max_size=12), max_size=4).map(bytes_elements))
def test_bytes_tensor_contents(raw: bytes) -> None:
    try:
        elements = kserve_v2.split_bytes_elements(raw)
    except BadInput:
        return
    assert bytes_elements(elements) == raw


@FUZZ
@given(BODIES, st.binary(max_size=48) | st.lists(st.binary(max_size=12), max_size=3).map(bytes_elements))
def test_open_inference_rest_request(body: object, binary: bytes) -> None:
    header = json.dumps(body).encode()
    try:
        parsed, rest = kserve_v2.split_body(header + binary, str(len(header)))
        kserve_v2.rest_outputs(parsed)
        images = kserve_v2.rest_images(parsed, rest)
    except BadInput:
        return
    assert images and all(isinstance(image, bytes) for image in images)


@FUZZ
@given(
    inputs=st.lists(
        st.tuples(
            st.sampled_from(["image", "pixels", ""]),
            st.sampled_from(["BYTES", "FP32", ""]),
            st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3) | st.lists(st.integers(-1, 3), max_size=2),
            st.lists(st.binary(max_size=12) | st.just(JPEG), max_size=3),
        ),
        max_size=2,
    ),
    raw=st.lists(st.binary(max_size=48) | st.lists(st.binary(max_size=12), max_size=3).map(bytes_elements), max_size=2),
    outputs=st.lists(
        st.tuples(
            st.sampled_from(["label", "probabilities", "logits"]),
            st.sampled_from([None, "int64_param", "bool_param", "string_param"]),
            st.integers(-5, 2000),
        ),
        max_size=3,
    ),
)
def test_open_inference_grpc_request(inputs: list, raw: list[bytes], outputs: list) -> None:
    request = service_pb2.ModelInferRequest(model_name="inception_v3", raw_input_contents=raw)
    for name, datatype, shape, contents in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=shape).contents.bytes_contents.extend(contents)
    for name, kind, value in outputs:
        output = request.outputs.add(name=name)
        if kind is not None:
            setattr(
                output.parameters["classification"],
                kind,
                {"bool_param": bool, "string_param": str}.get(kind, int)(value),
            )
    try:
        kserve_v2.grpc_outputs(request)
        images = kserve_v2.grpc_images(request)
    except BadInput:
        return
    assert images and all(isinstance(image, bytes) for image in images)

"""Fuzzing the decode path: whatever bytes arrive, ``prepare_image`` returns the
model's (299, 299, 3) uint8 input or raises one of the service's client errors
(400, 413, 415), never anything else; a 500 or a crashed worker would follow."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inception_v3.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from inception_v3.preprocessing import INPUT_SIZE, PixelLimits, prepare_image
from tests.images import valid_samples

CLIENT_ERRORS = (InvalidImage, PayloadTooLarge, UnsupportedMediaType)
# Small, so that headers mutated to declare large images are refused before any
# big allocation; the path is the same for any limit.
LIMITS = PixelLimits(max_image_pixels=1_000_000, max_jpeg_pixels=4_000_000)
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

"""``prepare_image``, the one decode path: every format and mode the service takes
gives the model the right pixels, and every bad input raises the client error
(and so the HTTP and gRPC status) it deserves."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from bentoml.grpc.utils import grpc_status_code
from PIL import Image, PngImagePlugin

from inception_v3.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType, register_grpc_status_codes
from inception_v3.preprocessing import INPUT_SIZE, DecodeLimits, prepare_image, read_image
from tests.conftest import CAT_JPEG
from tests.images import (
    EXIF_ORIENTATION,
    LOSSLESS_JPEG_PICTURE,
    MISTYPED_EXIF,
    bmp_declaring,
    encode,
    gif_of_no_pixels,
    jpeg_declaring,
    jpeg_declaring_bits,
    jpeg_declaring_components,
    jpeg_header_only,
    jpeg_luma_scan_first,
    jpeg_with_orientation,
    jpeg_with_repeated_scans,
    lossless_jpeg,
    picture,
    png_bomb,
    png_header_only,
    stored_for_orientation,
    unsupported_samples,
    valid_samples,
)

SAMPLES = valid_samples()
UPRIGHT = prepare_image(encode(picture(), "PNG")).astype(int)


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(int) - b.astype(int)).mean())


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_format_and_mode_gives_the_model_input(name: str) -> None:
    pixels = prepare_image(SAMPLES[name])
    assert pixels.shape == (INPUT_SIZE, INPUT_SIZE, 3)
    assert pixels.dtype == np.uint8


@pytest.mark.parametrize("name", ["png", "bmp", "png-16bit-rgb"])
def test_lossless_files_give_the_pictures_pixels(name: str) -> None:
    assert np.array_equal(prepare_image(SAMPLES[name]), UPRIGHT)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_lossless_jpeg_gives_the_pictures_pixels(mode: str) -> None:
    """No DCT, so no scaling while decoding: libjpeg refuses to, so it decodes in full."""
    image = LOSSLESS_JPEG_PICTURE.convert(mode)
    assert np.array_equal(prepare_image(lossless_jpeg(image)), prepare_image(encode(image, "PNG")))


@pytest.mark.parametrize("name", ["jpeg", "jpeg-progressive", "jpeg-cmyk", "webp"])
def test_lossy_files_give_nearly_the_pictures_pixels(name: str) -> None:
    assert mean_difference(prepare_image(SAMPLES[name]), UPRIGHT) < 2


@pytest.mark.parametrize("name", ["png-grayscale", "jpeg-grayscale", "png-16bit-grayscale"])
def test_grayscale_becomes_three_equal_channels(name: str) -> None:
    pixels = prepare_image(SAMPLES[name])
    assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
    expected = prepare_image(encode(picture().convert("L"), "PNG"))
    assert mean_difference(pixels, expected) < 2


def test_16_bit_samples_keep_their_high_byte() -> None:
    assert np.array_equal(prepare_image(SAMPLES["png-16bit-grayscale"]), prepare_image(SAMPLES["png-grayscale"]))


def test_transparency_is_composited_over_white() -> None:
    image = Image.new("RGBA", (64, 64), (200, 0, 0, 255))
    image.paste((0, 0, 200, 0), (0, 0, 32, 64))  # left half: blue, fully transparent
    pixels = prepare_image(encode(image, "PNG"))
    assert (pixels[:, :140] == 255).all()  # the resize blends a few columns at the border
    assert (pixels[:, 160:] == (200, 0, 0)).all()


def test_palette_transparency_is_composited_over_white() -> None:
    image = Image.new("P", (64, 64), 1)
    image.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    image.paste(0, (0, 0, 32, 64))
    pixels = prepare_image(encode(image, "PNG", transparency=0))
    assert (pixels[:, :140] == 255).all()
    assert (pixels[:, 160:] == (200, 0, 0)).all()


def test_animated_gif_gives_its_first_frame() -> None:
    pixels = prepare_image(SAMPLES["gif-animated"])
    first_frame = prepare_image(encode(picture().convert("P", palette=Image.Palette.ADAPTIVE), "GIF"))
    assert mean_difference(pixels, first_frame) < 8
    later_frame = np.zeros_like(pixels)
    later_frame[..., 2] = 255
    assert mean_difference(pixels, later_frame) > 50


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_upright_pixels(orientation: int) -> None:
    stored = stored_for_orientation(picture(), orientation)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    assert np.array_equal(prepare_image(encode(stored, "PNG", exif=exif.tobytes())), UPRIGHT)
    assert mean_difference(prepare_image(jpeg_with_orientation(stored, orientation)), UPRIGHT) < 2


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_of_mistyped_tags_keeps_its_orientation(fmt: str) -> None:
    stored = encode(
        stored_for_orientation(picture(), 6), fmt, exif=MISTYPED_EXIF, **({"quality": 95} if fmt == "JPEG" else {})
    )
    assert mean_difference(prepare_image(stored), UPRIGHT) < (2 if fmt == "JPEG" else 1e-9)


def test_metadata_pil_cannot_read_is_ignored() -> None:
    """A PNG's EXIF as hexadecimal text that is not, and metadata that inflates past PIL's 1 MB."""
    bad_exif = PngImagePlugin.PngInfo()
    bad_exif.add_text("Raw profile type exif", "\nexif\n  10\nzzzz\n")
    large_xmp = PngImagePlugin.PngInfo()
    large_xmp.add_itxt("XML:com.adobe.xmp", "a" * 2_000_000, zip=True)
    large_text = PngImagePlugin.PngInfo()
    large_text.add_text("Comment", "b" * 2_000_000, zip=True)
    for params in (
        {"pnginfo": bad_exif},
        {"pnginfo": large_xmp},
        {"pnginfo": large_text},
        {"icc_profile": b"c" * 2_000_000},
    ):
        assert np.array_equal(prepare_image(encode(picture(), "PNG", **params)), UPRIGHT), params


@pytest.mark.parametrize("name", ["jpeg", "png-rgba", "gif-animated"])
def test_api_workers_read_images_as_prepare_image_does(name: str) -> None:
    assert np.array_equal(asyncio.run(read_image(SAMPLES[name])), prepare_image(SAMPLES[name]))


def test_large_photo_within_the_limit() -> None:
    photo = picture(4000, 3000)
    assert prepare_image(encode(photo, "JPEG", quality=90)).shape == (INPUT_SIZE, INPUT_SIZE, 3)


def test_pixel_limit_counts_width_times_height() -> None:
    image = encode(picture(100, 50), "PNG")
    assert prepare_image(image, DecodeLimits(max_image_pixels=5000)).shape == (INPUT_SIZE, INPUT_SIZE, 3)
    with pytest.raises(PayloadTooLarge, match="100x50"):
        prepare_image(image, DecodeLimits(max_image_pixels=4999))


def test_a_50_megapixel_jpeg_is_decoded_with_dct_scaling() -> None:
    """Phones take 48-50 MP photos: over the full-decode limit, within the JPEG one (decoded at 1/8)."""
    photo = encode(picture(8160, 6120), "JPEG", quality=80)
    assert prepare_image(photo).shape == (INPUT_SIZE, INPUT_SIZE, 3)
    with pytest.raises(PayloadTooLarge, match="8160x6120"):
        prepare_image(encode(picture(8160, 6120), "PNG"))


def test_an_image_over_pils_own_limit_is_refused_in_the_configured_limits_words() -> None:
    with pytest.raises(PayloadTooLarge, match="30000x30000 = 900000000 pixels; the limit for PNG, which decodes"):
        prepare_image(png_bomb(30000))


def test_a_jpeg_dct_scaling_cannot_shrink_is_held_to_the_full_decode_limit() -> None:
    """A strip 300 pixels high decodes at full scale: its pixels count against max_image_pixels."""
    strip = encode(picture(4000, 300), "JPEG")
    limits = DecodeLimits(max_image_pixels=1_000_000, max_jpeg_pixels=2_000_000)
    with pytest.raises(PayloadTooLarge, match="to decode"):
        prepare_image(strip, limits)
    assert prepare_image(encode(picture(1200, 1200), "JPEG"), limits).shape == (INPUT_SIZE, INPUT_SIZE, 3)


MULTI_SCAN_JPEGS = {
    "progressive": lambda width, height: jpeg_declaring(width, height, progressive=True),
    "luma-scan-first": lambda width, height: jpeg_luma_scan_first(jpeg_declaring(width, height)),
}


@pytest.mark.parametrize("name", sorted(MULTI_SCAN_JPEGS))
def test_a_multi_scan_jpeg_is_held_to_the_full_decode_limit_from_its_header(name: str) -> None:
    """libjpeg keeps every DCT coefficient of a JPEG it cannot decode in one pass, whatever the scale:
    522 bytes declaring 65500x1800 cost 366 MiB. Refused from the header: this file has no scan data to decode."""
    header = jpeg_header_only(MULTI_SCAN_JPEGS[name](65500, 1800))
    with pytest.raises(
        PayloadTooLarge, match="65500x1800 = 117900000 pixels; the limit for a progressive or multi-scan JPEG"
    ):
        prepare_image(header)


@pytest.mark.parametrize("name", sorted(MULTI_SCAN_JPEGS))
def test_a_multi_scan_jpeg_within_the_full_decode_limit_decodes(name: str) -> None:
    make = MULTI_SCAN_JPEGS[name]
    limits = DecodeLimits(max_image_pixels=1_000_000, max_jpeg_pixels=4_000_000)
    assert prepare_image(make(1000, 1000), limits).shape == (INPUT_SIZE, INPUT_SIZE, 3)
    with pytest.raises(PayloadTooLarge, match="1000x1001"):
        prepare_image(make(1000, 1001), limits)
    assert prepare_image(make(4000, 3000)).shape == (INPUT_SIZE, INPUT_SIZE, 3)


def test_a_lossless_jpeg_is_held_to_the_full_decode_limit_from_its_header() -> None:
    limits = DecodeLimits(max_image_pixels=1_000_000, max_jpeg_pixels=4_000_000)
    assert prepare_image(lossless_jpeg(picture(1000, 1000)), limits).shape == (INPUT_SIZE, INPUT_SIZE, 3)
    with pytest.raises(
        PayloadTooLarge, match="1000x1001 = 1001000 pixels; the limit for a lossless JPEG, which decodes"
    ):
        prepare_image(jpeg_header_only(lossless_jpeg(picture(1000, 1001))), limits)


@pytest.mark.parametrize("make", [lambda: encode(picture(), "JPEG"), lambda: lossless_jpeg(picture())])
@pytest.mark.parametrize("bits", [12, 16])
def test_a_jpeg_of_more_than_8_bits_is_refused_by_name(make: Callable[[], bytes], bits: int) -> None:
    """PIL decodes 8-bit samples only; without a word of ours it would call the file no JPEG at all."""
    with pytest.raises(UnsupportedMediaType, match=f"a {bits}-bit JPEG: only 8-bit JPEGs are served"):
        prepare_image(jpeg_declaring_bits(make(), bits))


@pytest.mark.parametrize("bits", [0, 1, 17, 255])
def test_a_jpeg_frame_of_a_precision_no_jpeg_has_is_corrupt(bits: int) -> None:
    with pytest.raises(InvalidImage, match=f"corrupt image header: a JPEG frame of {bits}-bit samples"):
        prepare_image(jpeg_declaring_bits(encode(picture(), "JPEG"), bits))


def test_a_jpeg_of_more_scans_than_the_limit_is_refused_before_decoding() -> None:
    """libjpeg's progressive script writes 10 scans a colour image. Not counted: scan markers'
    bytes before the first scan (here in a comment; in a camera's file, in the EXIF thumbnail)
    and after the end of the image (a motion photo's video)."""
    progressive = encode(picture(), "JPEG", progressive=True, comment=b"\xff\xda" * 5)
    with_trailer = progressive + b"\xff\xda" * 1000
    assert prepare_image(with_trailer, DecodeLimits(max_jpeg_scans=10)).shape == (INPUT_SIZE, INPUT_SIZE, 3)
    with pytest.raises(PayloadTooLarge, match="the JPEG has more than 9 scans, the limit"):
        prepare_image(with_trailer, DecodeLimits(max_jpeg_scans=9))
    with pytest.raises(PayloadTooLarge, match="the JPEG has more than 100 scans, the limit"):
        prepare_image(jpeg_with_repeated_scans(progressive, 91))


def test_a_segment_between_scans_hides_no_scan_from_the_count() -> None:
    """A comment holding an end-of-image marker's bytes, then 91 more scans: libjpeg reads them all."""
    progressive = encode(picture(), "JPEG", progressive=True)
    comment = b"\xff\xfe\x00\x04\xff\xd9"
    bomb = jpeg_with_repeated_scans(progressive[:-2] + comment + progressive[-2:], 91)
    with pytest.raises(PayloadTooLarge, match="more than 100 scans"):
        prepare_image(bomb)


def test_a_jpeg_of_a_million_segments_between_scans_is_refused() -> None:
    """Refused at the 1,617th marker, so the count never walks a million (10 scans only: it
    would pass a count that walked them all)."""
    progressive = encode(picture(), "JPEG", progressive=True)
    comments = b"\xff\xfe\x00\x02" * 1_000_000
    with pytest.raises(PayloadTooLarge, match="more than 100 scans"):
        prepare_image(progressive[:-2] + comments + progressive[-2:])


def test_a_baseline_jpeg_keeps_the_jpeg_limit() -> None:
    """118 MP declared: decoded at 1/4 scale, 16375x450."""
    assert prepare_image(jpeg_declaring(65500, 1800)).shape == (INPUT_SIZE, INPUT_SIZE, 3)
    with pytest.raises(PayloadTooLarge, match="65500x1900 = 124450000 pixels; the limit for a JPEG is 120000000"):
        prepare_image(jpeg_header_only(jpeg_declaring(65500, 1900)))


# Refused from the header, before any pixel is decoded: (bytes, error, words of its message).
BAD_HEADERS = {
    "empty": (b"", InvalidImage, "empty request body"),
    "text": (b"hello, world", UnsupportedMediaType, "not a JPEG, PNG, WebP, BMP or GIF image"),
    "text that starts as a bmp's signature": (b"BMW " * 20, UnsupportedMediaType, "not a JPEG"),
    "html": (b"<html><body>not an image</body></html>", UnsupportedMediaType, "not a JPEG"),
    **{name: (data, UnsupportedMediaType, "not a JPEG") for name, data in unsupported_samples().items()},
    "png-zero-width": (png_header_only(0, 10), InvalidImage, "corrupt image header: a PNG file whose header"),
    "gif-of-no-pixels": (gif_of_no_pixels(), InvalidImage, "corrupt image header: a GIF file whose header"),
    "png-over-the-pixel-limit": (png_header_only(7000, 7000), PayloadTooLarge, "the limit for PNG"),
    "png-bomb-30000x30000": (png_bomb(30000), PayloadTooLarge, "30000x30000"),
    "jpeg-zero-width": (jpeg_declaring(0, 16), InvalidImage, "a JPEG of 0x16 pixels"),
    "jpeg-zero-height": (jpeg_declaring(16, 0), InvalidImage, "a JPEG of 16x0 pixels"),
    "jpeg-no-components": (jpeg_declaring_components(SAMPLES["jpeg"], 0), InvalidImage, "no components"),
    "jpeg-2-components": (jpeg_declaring_components(SAMPLES["jpeg"], 2), UnsupportedMediaType, "of 2 components"),
    "jpeg-wider-than-libjpeg-reads": (jpeg_declaring(65501, 16), PayloadTooLarge, "over 65500 px a side"),
    "bmp-negative-width": (bmp_declaring(-640, 480), InvalidImage, "a BMP of -640x480 pixels"),
    "bmp-zero-height": (bmp_declaring(640, 0), InvalidImage, "a BMP of 640x0 pixels"),
    "bmp-holding-a-jpeg": (
        bmp_declaring(96, 64, 0, 4, SAMPLES["jpeg"]),
        UnsupportedMediaType,
        "a BMP holding a JPEG: only uncompressed, RLE and bit-field BMPs",
    ),
    "bmp-holding-a-png": (bmp_declaring(96, 64, 0, 5, SAMPLES["png"]), UnsupportedMediaType, "holding a PNG"),
    "bmp-64-bit": (bmp_declaring(8, 8, 64, 0, bytes(512)), UnsupportedMediaType, "a 64-bit BMP"),
    "bmp-0-bit": (bmp_declaring(8, 8, 0, 0, bytes(512)), InvalidImage, "corrupt image header"),
}
# Refused while decoding.
BAD_PIXELS = {
    "truncated-jpeg": CAT_JPEG.read_bytes()[:50_000],
    "jpeg-header-only": CAT_JPEG.read_bytes()[:600],
    "truncated-png": SAMPLES["png-rgba"][:150],
    "truncated-gif": SAMPLES["gif-animated"][:900],
}


@pytest.mark.parametrize("name", sorted(BAD_HEADERS))
def test_bad_header_raises_its_client_error(name: str) -> None:
    data, error, message = BAD_HEADERS[name]
    with pytest.raises(error, match=re.escape(message)):
        prepare_image(data)


@pytest.mark.parametrize("name", sorted(BAD_PIXELS))
def test_corrupt_or_truncated_image_is_invalid(name: str) -> None:
    with pytest.raises(InvalidImage):
        prepare_image(BAD_PIXELS[name])


def test_client_errors_map_to_http_and_grpc_statuses() -> None:
    register_grpc_status_codes()
    expected = {
        InvalidImage: (400, grpc.StatusCode.INVALID_ARGUMENT),
        PayloadTooLarge: (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
        UnsupportedMediaType: (415, grpc.StatusCode.INVALID_ARGUMENT),
    }
    for error, (http_status, grpc_code) in expected.items():
        assert int(error.error_code) == http_status
        assert grpc_status_code(error("x")) == grpc_code

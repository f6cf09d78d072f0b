"""Image bytes to model input: decode, validate, orient, convert, resize.

One home for this path: the service's APIs and every door call ``read_image``
(in an API worker, off its event loop), the client checks files with
``open_image``, the tests, ``save_model.py`` (int8 calibration) and the benchmark
call ``prepare_image``. Every engine takes its uint8 pixels; scaling to [-1, 1]
happens inside the engine's graph.

Decoding happens in the API workers, with PIL: JPEGs with libjpeg's DCT scaling
(``draft()``), so a 50 MP photo decodes at 1/8 of its size. Measured on cat.jpg
(768x1024, 2-core EPYC): 3.2-3.3 ms; libjpeg-turbo through ``simplejpeg`` gave the
same pixels in 2.8 ms, not worth a second decoder and its wheel.

Limits: ``max_image_pixels`` bounds what is decoded in full (every format but
JPEG, and a JPEG after DCT scaling); ``max_jpeg_pixels`` bounds a JPEG's size as
its header declares it, since DCT scaling decodes at most 1/64 of those pixels.
Both are checked from the header, before any pixel is decoded. A JPEG libjpeg
cannot decode in one pass (progressive, or a first scan short of a component)
counts as decoded in full: libjpeg holds all its DCT coefficients whatever the
scale, 2 bytes a sample (a 40 MP 4:2:0 one: 116 MiB, as much as a 40 MP PNG). So
does a lossless JPEG: it has no DCT to scale (libjpeg fails on ``draft()``'s scale).
``max_jpeg_scans`` bounds a progressive JPEG's scans, counted from its markers before
decoding: libjpeg passes over all the coefficients at each, and one can be 82 bytes.

A few of PIL's readers are wrapped below: to tell the limits what the header holds,
and to ignore metadata PIL cannot read where browsers show the picture.
"""

from __future__ import annotations

import asyncio
import io
import re
import struct
import typing as t
import weakref
from dataclasses import dataclass

import numpy as np
from PIL import BmpImagePlugin, ExifTags, Image, ImageFile, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError

from .errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType

INPUT_SIZE = 299
# The only parsers PIL runs on request bytes; multi-picture JPEGs (MPO) open through JPEG's.
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
SUPPORTED_MEDIA_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif")
SUPPORTED_FORMAT_NAMES = "JPEG, PNG, WebP, BMP or GIF"  # as the error messages name them
DCT_SCALED_FORMATS = ("JPEG", "MPO")
BMP_HEADER_SIZES = (12, 40, 52, 56, 64, 108, 124)  # the DIB headers PIL reads
# How a file of each served format begins (a BMP: its DIB header's size too).
FILE_SIGNATURES = {
    "JPEG": re.compile(rb"\xff\xd8\xff"),
    "PNG": re.compile(rb"\x89PNG\r\n\x1a\n"),
    "GIF": re.compile(rb"GIF8[79]a"),
    "WebP": re.compile(rb"RIFF.{4}WEBP", re.DOTALL),
    "BMP": re.compile(rb"BM.{12}[%s]\0\0\0" % re.escape(bytes(BMP_HEADER_SIZES)), re.DOTALL),
}


@dataclass(frozen=True)
class DecodeLimits:
    max_image_pixels: int = 40_000_000  # decoded in full
    max_jpeg_pixels: int = 120_000_000  # declared by a JPEG header, decoded with DCT scaling
    max_jpeg_scans: int = 100  # libjpeg walks all the coefficients at each scan: 22 ms a scan at 36 MP


DEFAULT_LIMITS = DecodeLimits()

# PIL's own bomb check (an error over 179 MP) reads the same header as ours, which
# ``open_image`` checks right after PIL opens it; PIL's would only answer in its words
# instead of the configured limits', and cap those limits at its own.
Image.MAX_IMAGE_PIXELS = None


def read_start_of_scan(image: JpegImagePlugin.JpegImageFile, marker: int) -> None:
    """PIL skips this segment; keep how many components the first scan holds, for ``decodes_in_one_pass``."""
    assert image.fp is not None
    length = int.from_bytes(image.fp.read(2), "big")
    scan = image.fp.read(length - 2) if length > 2 else b""
    image.info["scan_components"] = scan[0] if scan else 0
    image.info["first_scan_at"] = image.fp.tell() - len(scan) - 4


def read_frame(image: JpegImagePlugin.JpegImageFile, marker: int) -> None:
    """PIL's frame reader, after naming what it would refuse as no JPEG at all, or libjpeg
    as a broken stream: samples of other than 8 bits (medical and lossless JPEGs use 12 or
    16), a precision or component count no JPEG has, no pixels, or a side over libjpeg's
    65,500. Marks a lossless frame."""
    assert image.fp is not None
    frame = image.fp.read(8)  # length, precision, height, width, components
    image.fp.seek(-len(frame), io.SEEK_CUR)
    if len(frame) == 8 and int.from_bytes(frame[:2], "big") >= 8:
        _length, bits, height, width, components = struct.unpack(">HBHHB", frame)
        if not 2 <= bits <= 16:  # ITU T.81's range
            raise InvalidImage(f"corrupt image header: a JPEG frame of {bits}-bit samples")
        if bits != 8:
            raise UnsupportedMediaType(f"a {bits}-bit JPEG: only 8-bit JPEGs are served")
        if width == 0 or height == 0:
            raise InvalidImage(f"corrupt image header: a JPEG of {width}x{height} pixels")
        if components == 0:
            raise InvalidImage("corrupt image header: a JPEG frame of no components")
        if components not in JPEG_COMPONENTS_SERVED:
            raise UnsupportedMediaType(
                f"a JPEG of {components} components: only 1 (grayscale), 3 (colour) or 4 (CMYK) are served"
            )
        if max(width, height) > JPEG_MAX_SIDE:
            raise PayloadTooLarge(f"image is {width}x{height}; libjpeg decodes no JPEG over {JPEG_MAX_SIDE} px a side")
    JpegImagePlugin.SOF(image, marker)
    if marker in LOSSLESS_FRAMES:
        image.info["lossless"] = True


JPEG_COMPONENTS_SERVED = (1, 3, 4)  # what PIL reads
JPEG_MAX_SIDE = 65_500  # libjpeg's JPEG_MAX_DIMENSION
LOSSLESS_FRAMES = (0xFFC3, 0xFFC7, 0xFFCB, 0xFFCF)  # ITU T.81 table B.1: the lossless processes' frame headers
JpegImagePlugin.MARKER[0xFFDA] = ("SOS", "Start of scan", read_start_of_scan)
JpegImagePlugin.MARKER.update(
    {
        marker: (name, description, read_frame)
        for marker, (name, description, handler) in JpegImagePlugin.MARKER.items()
        if handler is JpegImagePlugin.SOF
    }
)


# What PIL raises on bytes it cannot read: a client's error (400), never a 500. In metadata,
# which the service reads none of but the orientation, such a flaw is ignored, as browsers do.
PIL_READ_ERRORS = (OSError, ValueError, TypeError, SyntaxError, IndexError, KeyError, struct.error)
# The transpose that shows the picture as each EXIF orientation says it is seen.
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


read_bitmap = BmpImagePlugin.BmpImageFile._bitmap
# Microsoft's compressions PIL does not decode (a BMP holding a JPEG or PNG is for printers).
BMP_COMPRESSIONS_NOT_SERVED = {
    4: "a BMP holding a JPEG",
    5: "a BMP holding a PNG",
    6: "a BMP of alpha bit fields",
    11: "a CMYK BMP",
    12: "a CMYK RLE8 BMP",
    13: "a CMYK RLE4 BMP",
}


def read_bitmap_header(image: BmpImagePlugin.BmpImageFile, header: int = 0, offset: int = 0) -> None:
    """PIL's BMP header reader, after naming what it would misread or refuse as corrupt: no
    BMP at all (text that starts with "BM"), no pixels (PIL reads a negative width as 4
    billion), and variants of BMP it does not decode."""
    assert image.fp is not None
    start = header or image.fp.tell()
    image.fp.seek(start)
    fields = image.fp.read(20)  # header size, width, height, planes, bits, compression
    image.fp.seek(start)
    header_size = int.from_bytes(fields[:4], "little")
    if header_size not in BMP_HEADER_SIZES:
        raise SyntaxError("not a BMP file")  # to PIL's Image.open: not this format
    if header_size >= 40 and len(fields) == 20:
        width, height, _planes, bits, compression = struct.unpack("<iiHHI", fields[4:])
        if width <= 0 or height == 0:
            raise InvalidImage(f"corrupt image header: a BMP of {width}x{abs(height)} pixels")
        if compression in BMP_COMPRESSIONS_NOT_SERVED:
            raise UnsupportedMediaType(
                f"{BMP_COMPRESSIONS_NOT_SERVED[compression]}: only uncompressed, RLE and bit-field BMPs are served"
            )
        if bits == 64:  # GDI+'s 16 bits a channel
            raise UnsupportedMediaType("a 64-bit BMP: only BMPs of 1 to 32 bits a pixel are served")
    read_bitmap(image, header, offset)


BmpImagePlugin.BmpImageFile._bitmap = read_bitmap_header  # type: ignore[method-assign]


def upright(image: Image.Image) -> Image.Image:
    """The picture turned as its EXIF (or XMP) orientation says. Not ``ImageOps.exif_transpose``:
    that writes the EXIF back without the tag, and raised on a mistyped tag elsewhere in it."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation)
    except PIL_READ_ERRORS:  # e.g. a PNG's "Raw profile type exif" that is not hexadecimal
        return image
    method = ORIENTATIONS.get(orientation) if isinstance(orientation, int) else None
    return image if method is None else image.transpose(method)


read_dpi_from_exif = JpegImagePlugin.JpegImageFile._read_dpi_from_exif


def read_dpi_leniently(image: JpegImagePlugin.JpegImageFile) -> None:
    """PIL's, which an XResolution of one character made raise, and so refuse the file as no JPEG."""
    try:
        read_dpi_from_exif(image)
    except PIL_READ_ERRORS:
        image.info["dpi"] = 72, 72  # PIL's own answer to the EXIF it cannot read


def skipped_when_unreadable(read_chunk: t.Callable[[PngImagePlugin.PngStream, int, int], bytes]) -> t.Callable:
    """A PNG metadata chunk (ICC profile, compressed text) that inflates past PIL's 1 MB, which PIL
    calls a corrupt file, is skipped: its bytes are read again for the chunk's CRC check."""

    def read(stream: PngImagePlugin.PngStream, position: int, length: int) -> bytes:
        try:
            return read_chunk(stream, position, length)
        except ValueError:
            assert stream.fp is not None
            stream.fp.seek(position)
            return ImageFile._safe_read(stream.fp, length)

    return read


JpegImagePlugin.JpegImageFile._read_dpi_from_exif = read_dpi_leniently  # type: ignore[method-assign]
for metadata_chunk in ("chunk_iCCP", "chunk_zTXt", "chunk_iTXt"):
    setattr(
        PngImagePlugin.PngStream,
        metadata_chunk,
        skipped_when_unreadable(getattr(PngImagePlugin.PngStream, metadata_chunk)),
    )


def prepare_image(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Return the (299, 299, 3) uint8 RGB array the model takes for ``data``."""
    image = open_image(data, limits)
    try:
        if not image.info.get("lossless"):
            # JPEG only: let libjpeg scale down by 1/2, 1/4 or 1/8 while decoding,
            # never below the model's input size. A 12 MP photo decodes 5x faster.
            image.draft("RGB", (INPUT_SIZE, INPUT_SIZE))
        check_pixels(image, limits.max_image_pixels, "to decode")
        image = upright(image)
        image = to_rgb(image)
        image = image.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BILINEAR)
    except PIL_READ_ERRORS as error:
        raise InvalidImage(f"corrupt or truncated {image.format} image: {error}") from None
    return np.asarray(image, dtype=np.uint8)


decoding = 0  # read_image calls in progress in this process: the batches of an embedded runner wait for them
decodes_ended: weakref.WeakSet[asyncio.Event] = weakref.WeakSet()  # set as each read_image call ends


async def read_image(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """``prepare_image`` in a thread, so an API worker's event loop goes on serving meanwhile.

    Once this returns, its caller queues the pixels for the model without a pause of the
    event loop between, so ``decoding`` counts the images on their way to the next batch.
    """
    global decoding
    decoding += 1
    try:
        return await asyncio.to_thread(prepare_image, data, limits)
    finally:
        decoding -= 1
        for event in decodes_ended:
            event.set()


def open_image(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> Image.Image:
    """Read the header only: format and size are known before any pixel is decoded."""
    if not data:
        raise InvalidImage("empty request body: send the image file's bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError:
        if (signed_as := signature_format(data)) is not None:  # e.g. a PNG of 0 pixels, a GIF's cut header
            raise InvalidImage(f"corrupt image header: a {signed_as} file whose header PIL cannot read") from None
        raise UnsupportedMediaType(f"not a {SUPPORTED_FORMAT_NAMES} image") from None
    except PIL_READ_ERRORS as error:
        raise InvalidImage(f"corrupt image header: {error}") from None
    if image.format not in DCT_SCALED_FORMATS:
        check_pixels(image, limits.max_image_pixels, f"for {image.format}, which decodes in full")
    elif not decodes_in_one_pass(image):
        # Only these take more scans: libjpeg stops at a second scan of a one-pass JPEG.
        if count_scans(data, image.info.get("first_scan_at", 0), limits.max_jpeg_scans) > limits.max_jpeg_scans:
            raise PayloadTooLarge(f"the JPEG has more than {limits.max_jpeg_scans} scans, the limit")
        check_pixels(image, limits.max_image_pixels, "for a progressive or multi-scan JPEG, which decodes in full")
    elif image.info.get("lossless"):
        check_pixels(image, limits.max_image_pixels, "for a lossless JPEG, which decodes in full")
    else:
        check_pixels(image, limits.max_jpeg_pixels, "for a JPEG")
    return image


def signature_format(data: bytes) -> str | None:
    """The served format whose signature ``data`` begins with, if any."""
    return next((name for name, signature in FILE_SIGNATURES.items() if signature.match(data)), None)


# A marker: 0xFF, then neither a stuffed 0 (entropy-coded data's 0xFF), RST0-7, nor fill 0xFF.
JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
MARKERS_WITHOUT_LENGTH = (0x01, 0xD8)  # TEM, SOI


def count_scans(data: bytes, start: int, limit: int) -> int:
    """The start-of-scan markers from ``start`` to the end of the image, as libjpeg reads them:
    segments skipped by their length (a comment may hold any bytes), entropy-coded data to the
    next marker. What follows the end of the image (a motion photo's video) is not read. Stops
    past ``limit``, and counts as past it more than 16 segments a scan (a file of 4-byte
    comments: a million markers to walk), where an encoder writes 2 or 3 (tables, the scan)."""
    scans = markers = 0
    position = start
    while scans <= limit and (found := JPEG_MARKER.search(data, position)) is not None:
        marker = data[found.start() + 1]
        if marker == 0xD9:  # end of image
            break
        scans += marker == 0xDA
        if (markers := markers + 1) > 16 * (limit + 1):
            return limit + 1
        length = 0 if marker in MARKERS_WITHOUT_LENGTH else int.from_bytes(data[found.end() : found.end() + 2], "big")
        position = found.end() + length
    return scans


def decodes_in_one_pass(image: Image.Image) -> bool:
    """A JPEG that is not progressive and whose first scan holds every component: libjpeg then
    keeps only a row of blocks at a time, while a multi-scan one keeps all the image's coefficients."""
    return not image.info.get("progressive") and image.info.get("scan_components") == getattr(image, "layers", None)


def check_pixels(image: Image.Image, limit: int, what: str) -> None:
    width, height = image.size
    if width * height > limit:
        raise PayloadTooLarge(f"image is {width}x{height} = {width * height} pixels; the limit {what} is {limit}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB; transparency is composited over white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit samples: keep the high byte (PIL's own convert would clip at 255).
        high_byte = (np.asarray(image, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(high_byte, "L")
    elif image.mode == "F":
        image = Image.fromarray(np.asarray(image).clip(0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")  # convert copies an RGB image

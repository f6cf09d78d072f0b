"""Image files the hardening tests send: every format and mode the service must
take, made with PIL from one synthetic picture, and the bad input it must refuse."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112


def picture(width: int = 96, height: int = 64) -> Image.Image:
    """An RGB picture with no symmetry, so a wrong rotation or channel order shows."""
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + 2 * y) % 256], axis=-1)
    pixels[: height // 4, : width // 4] = (250, 20, 20)  # a red corner: top left
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


ExifEntry = tuple[int, int, int, bytes]  # tag, type, count, the value's 4 bytes


def raw_exif(entries: list[ExifEntry], gps: list[ExifEntry] | None = None) -> bytes:
    """An EXIF block written by hand (big-endian TIFF), for the mistyped tags PIL will not write."""

    def ifd(entries: list[ExifEntry]) -> bytes:
        packed = b"".join(struct.pack(">HHI", tag, kind, count) + value for tag, kind, count, value in entries)
        return struct.pack(">H", len(entries)) + packed + b"\0\0\0\0"

    if gps is not None:  # the GPS IFD follows the first: the TIFF header (8 bytes), then the first IFD
        entries = [*entries, (0x8825, 4, 1, struct.pack(">I", 8 + 2 + 12 * (len(entries) + 1) + 4))]
    return b"Exif\0\0MM\0\x2a\0\0\0\x08" + ifd(entries) + (ifd(gps) if gps is not None else b"")


# Orientation 6, and three tags of a type PIL does not expect: it failed on each while
# browsers show the picture (GPSVersionID and XResolution as text: 500 from the orientation's
# transpose; an XResolution of one character: "not a JPEG" from the resolution's reading).
MISTYPED_EXIF = raw_exif(
    [
        (EXIF_ORIENTATION, 3, 1, b"\0\x06\0\0"),
        (0x011A, 2, 2, b"7\0\0\0"),  # XResolution
        (0x0128, 3, 1, b"\0\x02\0\0"),  # ResolutionUnit
    ],
    gps=[(0x0000, 2, 4, b"2.2\0")],  # GPSVersionID
)


def jpeg_with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def stored_for_orientation(upright: Image.Image, orientation: int) -> Image.Image:
    """What a camera stores so that the EXIF ``orientation`` shows ``upright``."""
    inverse = {
        1: None,
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }[orientation]
    return upright if inverse is None else upright.transpose(inverse)


def animated_gif(frames: int = 3) -> bytes:
    """First frame: the picture; later frames: solid colours."""
    first = picture()
    others = [Image.new("RGB", first.size, (0, 0, 255 - 40 * i)) for i in range(frames - 1)]
    return encode(first, "GIF", save_all=True, append_images=others, duration=100, loop=0)


def png_file(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG written by hand, for what PIL will not write."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds a few hundred bytes: a decompression bomb's header."""

    return png_file(width, height, 8, 2, zlib.compress(b"\0" * 1024))


def bmp_declaring(width: int, height: int, bits: int = 24, compression: int = 0, pixels: bytes = b"") -> bytes:
    """A BMP whose BITMAPINFOHEADER declares these fields, followed by ``pixels`` (any bytes)."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, bits, compression, len(pixels), 2835, 2835, 0, 0)
    offset = 14 + len(info)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + pixels


def gif_of_no_pixels() -> bytes:
    """A GIF written by hand whose screen and only frame are 0x0 (no colour table, an empty LZW stream)."""
    screen = struct.pack("<HHBBB", 0, 0, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, 0, 0, 0) + b"\x02\x02\x44\x01\x00"  # LZW: clear, end
    return b"GIF89a" + screen + frame + b";"


def png_bomb(side: int) -> bytes:
    """A valid PNG of ``side`` x ``side`` black pixels in under 1 MB: a decompression bomb.

    Zlib blocks ended by a full flush stand alone, so one compressed block of
    1000 rows is repeated; the Adler-32 of ``n`` zero bytes is ``(n % 65521) << 16 | 1``.
    """
    rows_per_block = 1000
    assert side % rows_per_block == 0
    block = b"\0" * ((side + 1) * rows_per_block)  # each row: filter byte 0, then one grayscale byte per pixel
    compressor = zlib.compressobj(9)
    first = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeated = compressor.compress(block) + compressor.flush(zlib.Z_FULL_FLUSH)
    adler = ((side + 1) * side % 65521) << 16 | 1
    final_empty_block = b"\x03\x00"
    idat = first + repeated * (side // rows_per_block - 1) + final_empty_block + adler.to_bytes(4, "big")
    return png_file(side, side, 8, 0, idat)


def jpeg_declaring(width: int, height: int, progressive: bool = False) -> bytes:
    """A 16x16 JPEG whose frame header declares ``width`` x ``height``: a few hundred bytes
    that libjpeg decodes at that size, padding the missing blocks."""
    data = encode(picture(16, 16), "JPEG", progressive=progressive)
    frame = jpeg_frame(data)
    return data[: frame + 5] + struct.pack(">HH", height, width) + data[frame + 9 :]


def jpeg_frame(data: bytes) -> int:
    """Where a JPEG's frame header begins. Walks the segments: an EXIF thumbnail inside APP1
    holds a frame header of its own."""
    position = 2
    while data[position + 1] not in (0xC0, 0xC1, 0xC2, 0xC3):
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")
    return position


def jpeg_declaring_bits(data: bytes, bits: int) -> bytes:
    """A JPEG whose frame header declares ``bits``-bit samples."""
    precision = jpeg_frame(data) + 4
    return data[:precision] + bytes([bits]) + data[precision + 1 :]


def jpeg_declaring_components(data: bytes, components: int) -> bytes:
    """A JPEG whose frame header counts ``components`` components; the specifications after it stay the file's."""
    count = jpeg_frame(data) + 9
    return data[:count] + bytes([components]) + data[count + 1 :]


def jpeg_with_repeated_scans(data: bytes, repeats: int) -> bytes:
    """``data``'s last scan ``repeats`` times more: each a pass of libjpeg's over every coefficient
    (no valid progression by ITU T.81, but libjpeg only warns). 82 bytes cost 22 ms at 36 MP."""
    last_scan = data.rindex(b"\xff\xda")
    return data[:-2] + data[last_scan:-2] * repeats + data[-2:]


def jpeg_first_scan(data: bytes) -> tuple[int, int]:
    """Where a JPEG's first start-of-scan segment begins and ends."""
    start = data.index(b"\xff\xda")
    return start, start + 2 + int.from_bytes(data[start + 2 : start + 4], "big")


def jpeg_luma_scan_first(data: bytes) -> bytes:
    """A sequential colour JPEG whose first scan holds the luma component only: it takes several scans."""
    start, end = jpeg_first_scan(data)
    luma_only = b"\xff\xda" + struct.pack(">HB", 8, 1) + data[start + 5 : start + 7] + bytes([0, 63, 0])
    return data[:start] + luma_only + data[end:]


def jpeg_header_only(data: bytes) -> bytes:
    """A JPEG cut after its first start-of-scan segment: it cannot decode, so only its header can refuse it."""
    return data[: jpeg_first_scan(data)[1]]


# Both sides at least twice the model's input: DCT scaling would halve a DCT JPEG this size.
LOSSLESS_JPEG_PICTURE = picture(600, 600)


def valid_samples() -> dict[str, bytes]:
    """Valid images of every format and mode the service takes, each classifiable."""
    rgb = picture()
    gray = rgb.convert("L")
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, rgb.width, dtype=np.uint8), (rgb.height, 1))))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette_transparent = palette.copy()
    palette_transparent.info["transparency"] = 0
    gray16 = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)
    rgb16 = np.asarray(rgb, dtype=np.uint16) * 257
    return {
        "jpeg": encode(rgb, "JPEG", quality=95),
        "jpeg-progressive": encode(rgb, "JPEG", quality=95, progressive=True),
        "jpeg-grayscale": encode(gray, "JPEG", quality=95),
        "jpeg-cmyk": encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "jpeg-exif-rotated": jpeg_with_orientation(stored_for_orientation(rgb, 6), 6),
        "jpeg-lossless": lossless_jpeg(LOSSLESS_JPEG_PICTURE),
        "jpeg-exif-mistyped": encode(stored_for_orientation(rgb, 6), "JPEG", quality=95, exif=MISTYPED_EXIF),
        "png": encode(rgb, "PNG"),
        "png-rgba": encode(rgba, "PNG"),
        "png-la": encode(rgba.convert("LA"), "PNG"),
        "png-grayscale": encode(gray, "PNG"),
        "png-palette": encode(palette, "PNG"),
        "png-palette-transparent": encode(palette_transparent, "PNG", transparency=0),
        "png-16bit-grayscale": encode(gray16, "PNG"),
        "png-16bit-rgb": png_16bit_rgb(rgb16),
        "png-1bit": encode(gray.convert("1"), "PNG"),
        "gif": encode(palette, "GIF"),
        "gif-animated": animated_gif(),
        "bmp": encode(rgb, "BMP"),
        "webp": encode(rgb, "WEBP", quality=95),
        "webp-alpha": encode(rgba, "WEBP", quality=95),
    }


def png_16bit_rgb(pixels: np.ndarray) -> bytes:
    """PIL writes no 16-bit RGB PNG; this one is written by hand (filter 0, big-endian samples)."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\0" + pixels[row].astype(">u2").tobytes() for row in range(height))

    return png_file(width, height, 16, 2, zlib.compress(raw))


def unsupported_samples() -> dict[str, bytes]:
    """Real images in formats the service does not take (415)."""
    rgb = picture()
    return {"tiff": encode(rgb, "TIFF"), "ico": encode(rgb, "ICO"), "pdf": encode(rgb, "PDF")}


def lossless_jpeg(image: Image.Image) -> bytes:
    """A lossless JPEG (SOF3, ITU T.81 annex H) of an L or RGB ``image``, which PIL cannot write.

    Predictor 1 (the sample to the left; the one above at a row's start, 128 at the
    first); one Huffman table giving each difference category 0-8 a 4-bit code. Colour
    components are named R, G, B, so libjpeg decodes them without a YCbCr conversion.
    """
    samples = np.asarray(image, dtype=np.int32).reshape(image.height, image.width, -1)
    predicted = np.empty_like(samples)
    predicted[:, 1:] = samples[:, :-1]
    predicted[1:, 0] = samples[:-1, 0]
    predicted[0, 0] = 128
    differences = (samples - predicted).ravel()  # in scan order: row by row, a pixel's components together
    categories = np.frexp(np.abs(differences))[1].astype(np.int64)  # the bit length of |difference|
    extra_bits = np.where(differences < 0, differences + (1 << categories) - 1, differences)
    codes = (categories << categories | extra_bits).astype(np.uint64)
    lengths = 4 + categories
    left_aligned = (codes << (64 - lengths).astype(np.uint64)).astype(">u8")
    bits = np.unpackbits(left_aligned.view(np.uint8)).reshape(-1, 64)[np.arange(64) < lengths[:, None]]
    bits = np.concatenate([bits, np.ones(-len(bits) % 8, np.uint8)])  # padded with 1-bits
    scan = np.packbits(bits).tobytes().replace(b"\xff", b"\xff\x00")

    components = samples.shape[2]
    names = b"RGB" if components == 3 else b"\x01"

    def segment(marker: int, payload: bytes) -> bytes:
        return struct.pack(">HH", marker, len(payload) + 2) + payload

    frame = struct.pack(">BHHB", 8, image.height, image.width, components)
    frame += b"".join(bytes([name, 0x11, 0]) for name in names)
    huffman_table = b"\x00" + bytes([0, 0, 0, 9] + [0] * 12) + bytes(range(9))
    start_of_scan = bytes([components]) + b"".join(bytes([name, 0]) for name in names) + bytes([1, 0, 0])
    return (
        b"\xff\xd8"
        + segment(0xFFC3, frame)
        + segment(0xFFC4, huffman_table)
        + segment(0xFFDA, start_of_scan)
        + scan
        + b"\xff\xd9"
    )

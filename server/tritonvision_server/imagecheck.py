"""A cheap header check of encoded images, run before they reach the decoder.

DALI decodes a whole batch at once and fails all of it when one sample is bad, so every request is first
checked on its own here: a known format, dimensions read from the header within the limits, for JPEG
and PNG an end marker where the image data ends (a truncated upload, the commonest damage, fails the
decoder), and for PNG and WebP chunks that fit in the file (the decoder allocates what a chunk declares).
This scans the bytes once at memory speed and never decodes pixels. Damage that only decoding
finds (corrupt entropy-coded data that still ends properly) is left to the caller: the cpu profile retries
the batch request by request; in the gpu profile the DALI backend fails the whole batch.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from tritonvision.spec import IMAGE_LIMITS, ImageLimits


class InvalidImage(ValueError):
    """The encoded image is refused; the message says why, for the client."""


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """``(marker, offset, length)`` of each marker segment of a JPEG after its start-of-image, up to and
    including the first start-of-scan, or end-of-image (length 0); stops where the data ends. Raises
    :class:`InvalidImage` at a byte that is not a marker."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise InvalidImage("corrupt JPEG: bad marker")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker == 0xD9:
            yield marker, i, 0
            return
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        yield marker, i, length
        if marker == 0xDA:
            return
        i += 2 + length


def is_frame_header(marker: int) -> bool:
    """SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC): the segments that carry the frame size."""
    return 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)


def _jpeg_size(data: bytes) -> tuple[int, int]:
    for marker, i, _ in jpeg_segments(data):
        if marker in (0xD9, 0xDA):
            break  # end of image / start of scan before any frame header
        if is_frame_header(marker):
            if i + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
    raise InvalidImage("corrupt or truncated JPEG: no frame header")


def _jpeg_complete(data: bytes) -> None:
    """Refuse a JPEG whose scan data is not followed by an end-of-image marker (a truncated file).

    Inside entropy-coded data every 0xFF byte is followed by 0x00 or a restart marker, so the first FF D9
    after the first start-of-scan is the real end of image. Trailing bytes after it (padding, an appended
    video) are allowed, as decoders ignore them; the test is the same whichever occurrence is found.
    """
    for marker, i, length in jpeg_segments(data):
        if marker == 0xD9:
            raise InvalidImage("corrupt JPEG: end of image before any scan data")
        if marker == 0xDA:
            # rfind: the marker is normally in the last bytes, so this returns at once.
            if data.rfind(b"\xff\xd9", i + 2 + length) < 0:
                raise InvalidImage(f"truncated JPEG: no end-of-image marker after the scan data ({len(data)} bytes)")
            return
    raise InvalidImage(f"truncated JPEG: the data ends before the scan data ({len(data)} bytes)")


# Chunks the walks below read at most. It bounds the cost of a file of empty chunks (a 64 MB PNG of them is
# 5.6 million, 1.4 s to walk); libpng writes IDAT chunks of 8 KiB, ~8000 in a PNG at the byte limit.
MAX_CHUNKS = 1 << 18


def _png_complete(data: bytes) -> None:
    """Walk the chunks up to IEND; refuse a chunk whose declared length runs past the end of the file, a
    file without IEND (truncated), and an IEND before any IDAT.

    DALI 2.4's PNG decoders allocate the length an eXIf, PLTE or IDAT chunk declares before they read the
    chunk: a 2 GB length in a file of a few hundred bytes cost 2 GiB and 2.5 s before the decoder failed.
    Chunks after IEND are not read, unless IEND comes before the image data: then the decoder read on past
    it (4 GiB for an IDAT declaring 0xFFFFFFF0 bytes there), so that is refused as well.
    """
    pos, n = 8, len(data)
    seen_data = False
    for _ in range(MAX_CHUNKS):
        if pos + 12 > n:
            raise InvalidImage(f"truncated PNG: no IEND chunk ({n} bytes)")
        (length,) = struct.unpack_from(">I", data, pos)
        if pos + 12 + length > n:
            raise InvalidImage(f"truncated PNG: a chunk of {length} bytes at byte {pos} runs past the end of the "
                               f"file ({n} bytes)")
        kind = data[pos + 4 : pos + 8]
        if kind == b"IEND":
            if not seen_data:
                raise InvalidImage("corrupt PNG: IEND chunk before any image data (IDAT)")
            return
        seen_data = seen_data or kind == b"IDAT"
        pos += 12 + length
    raise InvalidImage(f"corrupt PNG: more than {MAX_CHUNKS} chunks")


def _webp_complete(data: bytes) -> None:
    """Refuse a WebP whose RIFF size runs past the end of the data (truncated), or one of whose chunks runs
    past the end of the RIFF data it declares, or, after it, past the end of the data.

    DALI 2.4's WebP parser allocates the size an EXIF chunk declares before it reads the chunk, and looks for
    that chunk past the RIFF data too: one bit flipped in that size in a 694-byte file cost 1 GiB, 0xFFFFFFF0
    4 GiB and 20 s, before the decoder failed. Zero bytes after the RIFF data (a padded row of a request)
    are not walked.
    """
    n = len(data)
    end = 8 + int.from_bytes(data[4:8], "little")
    if end > n:
        raise InvalidImage(f"truncated WebP: its RIFF header declares {end} bytes, the file has {n}")
    pos = 12
    for _ in range(MAX_CHUNKS):
        if pos >= end:
            if data.count(0, pos) == n - pos:
                return
            end = n  # bytes other than padding after the RIFF data: walked like chunks, as the parser does
        if pos + 8 > end:
            return
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if pos + 8 + size > end:
            raise InvalidImage(f"truncated WebP: a chunk of {size} bytes at byte {pos} runs past the end of the "
                               f"file ({end} bytes)")
        pos += 8 + size + (size & 1)
    raise InvalidImage(f"corrupt WebP: more than {MAX_CHUNKS} chunks")


_COMPLETENESS = {"jpeg": _jpeg_complete, "png": _png_complete, "webp": _webp_complete}


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise InvalidImage("corrupt PNG: no IHDR chunk")
    return struct.unpack(">II", data[16:24])


def _bmp_size(data: bytes) -> tuple[int, int]:
    if len(data) < 26:
        raise InvalidImage("truncated BMP header")
    width, height = struct.unpack("<ii", data[18:26])
    return width, abs(height)


def _tiff_size(data: bytes) -> tuple[int, int]:
    end = "<" if data[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack(end + "I", data[4:8])
        (count,) = struct.unpack(end + "H", data[ifd : ifd + 2])
        tags = {}
        for k in range(count):
            off = ifd + 2 + 12 * k
            tag, typ, n = struct.unpack(end + "HHI", data[off : off + 8])
            if tag in (256, 257):
                # One SHORT or LONG, held in the entry. Of more values, or of a wider type, the field is an
                # offset to them, which decoders follow (PIL took the first of 255 LONGs there: 65539).
                if typ not in (3, 4) or n != 1:
                    what = "width" if tag == 256 else "height"
                    raise InvalidImage(f"corrupt TIFF: its image {what} is not one SHORT or LONG value")
                fmt = "H" if typ == 3 else "I"
                (tags[tag],) = struct.unpack(end + fmt, data[off + 8 : off + 8 + struct.calcsize(fmt)])
        return tags[256], tags[257]
    except (struct.error, KeyError) as exc:
        raise InvalidImage("corrupt TIFF: no image size in the first directory") from exc


# Bytes each WebP header needs for its size: the frame header of VP8, the bit-packed size of VP8L, the
# 24-bit canvas size of VP8X.
_WEBP_HEADER_BYTES = {b"VP8 ": 30, b"VP8L": 25, b"VP8X": 30}


def _webp_size(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk not in _WEBP_HEADER_BYTES:
        raise InvalidImage("corrupt WebP: unknown chunk")
    if len(data) < _WEBP_HEADER_BYTES[chunk]:
        raise InvalidImage("truncated WebP header")
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L":
        b = int.from_bytes(data[21:25], "little")
        return (b & 0x3FFF) + 1, ((b >> 14) & 0x3FFF) + 1
    return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1


def exif_orientation(exif: bytes) -> int:
    """The orientation tag (0x0112) of IFD0 in EXIF data: a TIFF structure, after ``Exif\\0\\0`` as a JPEG's
    APP1 segment carries it (a WebP's EXIF chunk may omit that). 1 (upright) when absent or unreadable."""
    tiff = exif[6:] if exif.startswith(b"Exif\0\0") else exif
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        return 1
    try:
        (ifd,) = struct.unpack(order + "I", tiff[4:8])
        (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
        for k in range(count):
            entry = tiff[ifd + 2 + 12 * k : ifd + 14 + 12 * k]
            tag, kind = struct.unpack(order + "HH", entry[:4])
            if tag == 0x0112 and kind == 3:  # SHORT, stored in the first two bytes of the value field
                (value,) = struct.unpack(order + "H", entry[8:10])
                return value if 1 <= value <= 8 else 1
    except struct.error:
        return 1
    return 1


def webp_orientation(data: bytes) -> int:
    """The EXIF orientation of a WebP file (its ``EXIF`` chunk, usually after the image data); 1 without one.
    Walks the RIFF chunk headers only."""
    pos = 12
    while pos + 8 <= len(data):
        fourcc = bytes(data[pos : pos + 4])
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if fourcc == b"EXIF":
            return exif_orientation(bytes(data[pos + 8 : pos + 8 + size]))
        pos += 8 + size + (size & 1)
    return 1


_SIGNATURES = (
    (b"\xff\xd8\xff", "jpeg", _jpeg_size),
    (b"\x89PNG\r\n\x1a\n", "png", _png_size),
    (b"BM", "bmp", _bmp_size),
    (b"II*\x00", "tiff", _tiff_size),
    (b"MM\x00*", "tiff", _tiff_size),
)


def inspect(data: bytes, limits: ImageLimits = IMAGE_LIMITS) -> ImageInfo:
    """Return the image's format and size, or raise :class:`InvalidImage` with a message for the client."""
    if len(data) == 0:
        raise InvalidImage("empty image: the request carried 0 bytes")
    if len(data) > limits.max_bytes:
        raise InvalidImage(f"image of {len(data)} bytes exceeds the limit of {limits.max_bytes} bytes")
    head = bytes(data[:65536])
    for magic, fmt, size in _SIGNATURES:
        if head.startswith(magic):
            break
    else:
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            fmt, size = "webp", _webp_size
        else:
            # Never echo request bytes in an error: a message that quotes them turns any path that feeds
            # foreign memory into a request (client shared memory) into a way to read it.
            raise InvalidImage(f"not a supported image: accepted formats are {', '.join(limits.formats)}")
    if fmt not in limits.formats:
        raise InvalidImage(f"{fmt} images are not accepted: accepted formats are {', '.join(limits.formats)}")
    # A TIFF's first directory and a JPEG's frame header may lie anywhere (a JPEG's metadata segments ahead
    # of it reach hundreds of KB); the other formats put their size in the first bytes.
    complete = _COMPLETENESS.get(fmt)
    whole = data if isinstance(data, bytes) or (fmt not in ("tiff", "jpeg") and complete is None) else bytes(data)
    width, height = size(whole if fmt in ("tiff", "jpeg") else head)
    if width <= 0 or height <= 0:
        raise InvalidImage(f"corrupt {fmt.upper()}: image size {width}x{height}")
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise InvalidImage(
            f"image of {width}x{height} pixels exceeds the limit of {limits.max_side} pixels a side "
            f"and {limits.max_pixels // 1_000_000} megapixels"
        )
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise InvalidImage(
            f"image of {width}x{height} pixels exceeds the limit of {limits.max_aspect_ratio:g}:1 aspect ratio"
        )
    if complete is not None:
        complete(whole)
    return ImageInfo(fmt, width, height)


def inspect_rows(array, check: Callable[[bytes], ImageInfo] = inspect) -> list[ImageInfo]:
    """``check`` (:func:`inspect`) each image of a request's ``[batch, bytes]`` UINT8 tensor (1-D: one image).

    Rows of a padded multi-image request end in zeros, which decoders ignore after the end marker.
    """
    rows = array.reshape(1, -1) if array.ndim == 1 else array
    return [check(row.tobytes()) for row in rows]

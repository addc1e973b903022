"""The header check ahead of the decoder: each format's size, truncation, the limits, and end markers that
occur before the scan data. Images are made here with Pillow and edited byte by byte."""

from __future__ import annotations

import dataclasses
import io
import math
import struct
import zlib

import numpy as np
import pytest
from PIL import ExifTags, Image

from image_helpers import orientation_exif
from tritonvision import spec
from tritonvision_server.imagecheck import ImageInfo, InvalidImage, inspect, inspect_rows, webp_orientation

# Width and height differ, so that a parser that swaps them fails.
W, H = 37, 23
LIMITS = spec.IMAGE_LIMITS


def pixels(width: int = W, height: int = H, channels: int = 3) -> np.ndarray:
    # Noise: every format gets real scan data to compress (and to cut).
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)


def save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def jpeg(width: int = W, height: int = H, **kwargs) -> bytes:
    return save(Image.fromarray(pixels(width, height)), "JPEG", quality=90, **kwargs)


def png(width: int = W, height: int = H) -> bytes:
    return save(Image.fromarray(pixels(width, height)), "PNG")


def segments(data: bytes) -> list[tuple[int, bytes]]:
    """A JPEG's marker segments up to (not including) the start of scan: (marker, whole segment bytes)."""
    out, i = [], 2
    while data[i + 1] != 0xDA:
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        out.append((data[i + 1], data[i : i + 2 + length]))
        i += 2 + length
    return out


def with_segment(data: bytes, segment: bytes) -> bytes:
    """``data`` with ``segment`` inserted right after the start-of-image marker."""
    return data[:2] + segment + data[2:]


def com_segment(text: bytes) -> bytes:
    return b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text


def exif_with_thumbnail(thumbnail: bytes) -> bytes:
    """An APP1 Exif segment whose IFD1 carries ``thumbnail`` (a whole JPEG, FF D9 included), as cameras write."""
    # TIFF header (little-endian), IFD0 with no entries pointing to IFD1, IFD1 with the thumbnail's offset and length.
    ifd1 = 8 + 2 + 4
    entries = [(0x0201, 4, 1, ifd1 + 2 + 2 * 12 + 4), (0x0202, 4, 1, len(thumbnail))]
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<HI", 0, ifd1)
    tiff += struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + struct.pack("<I", 0)
    body = b"Exif\x00\x00" + tiff + thumbnail
    return b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body


def cut_in_scan_data(data: bytes) -> bytes:
    """``data`` cut in the middle of its entropy-coded data: the end-of-image marker is gone."""
    sos = data.rfind(b"\xff\xda")
    cut = data[: sos + (len(data) - sos) // 2]
    assert cut.count(b"\xff\xd9") == data.count(b"\xff\xd9") - 1
    return cut


def refused(data: bytes, limits=LIMITS, *, what: str = "") -> str:
    """The refusal's message; fails naming ``what`` should have been refused when the data is accepted."""
    try:
        info = inspect(data, limits)
    except InvalidImage as exc:
        return str(exc)
    pytest.fail(f"accepted {what or 'data that must be refused'} as {info}")


# --- each format's size ------------------------------------------------------------------------------------


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
def test_jpeg_size_comes_from_its_frame_header(progressive):
    data = jpeg(progressive=progressive)
    sof = 0xC2 if progressive else 0xC0
    assert sof in [m for m, _ in segments(data)], "Pillow wrote another frame type than the test means to check"
    assert inspect(data) == ImageInfo("jpeg", W, H)


def test_jpeg_tables_before_the_frame_header_are_not_read_as_a_frame():
    # DHT (FF C4) lies in the SOF range C0..CF but carries no size; writers may put it before the frame.
    data = jpeg()
    segs = segments(data)
    head = b"".join(s for m, s in segs if m == 0xC4) + b"".join(s for m, s in segs if m != 0xC4)
    moved = data[:2] + head + data[2 + len(head) :]
    markers = [m for m, _ in segments(moved)]
    assert markers.index(0xC4) < markers.index(0xC0)
    assert inspect(moved) == ImageInfo("jpeg", W, H)


def test_jpeg_with_exif_and_fill_bytes_before_the_frame_header():
    data = save(Image.fromarray(pixels()), "JPEG", exif=Image.Exif().tobytes(), comment=b"made by a test")
    # Fill bytes (FF FF ...) may precede any marker.
    sof = data.find(b"\xff\xc0")
    padded = data[:sof] + b"\xff\xff\xff" + data[sof:]
    assert inspect(data) == inspect(padded) == ImageInfo("jpeg", W, H)


def test_jpeg_with_more_metadata_than_one_read_ahead_before_its_frame_header():
    # Phones and editors write ICC profiles, XMP and MPF segments of tens to hundreds of KB ahead of the
    # frame header; the size must come from the header wherever it lies in the file.
    data = jpeg(icc_profile=b"\0" * 300_000)
    assert data.find(b"\xff\xc0") > 300_000
    assert inspect(data) == ImageInfo("jpeg", W, H)
    assert inspect_rows(np.frombuffer(data, np.uint8)) == [ImageInfo("jpeg", W, H)]


def test_png_size_comes_from_its_ihdr_chunk():
    assert inspect(png()) == ImageInfo("png", W, H)


@pytest.mark.parametrize("top_down", [False, True], ids=["bottom-up", "top-down"])
def test_bmp_size_comes_from_its_info_header(top_down):
    data = bytearray(save(Image.fromarray(pixels()), "BMP"))
    if top_down:  # a negative height means rows stored top to bottom
        data[22:26] = struct.pack("<i", -H)
    assert inspect(bytes(data)) == ImageInfo("bmp", W, H)


def tiff_by_hand(order: str, size_type: int) -> bytes:
    """A minimal TIFF: header, then one directory with width and height as SHORT (3) or LONG (4) values."""
    end = "<" if order == "II" else ">"
    value = "H2x" if size_type == 3 else "I"
    entries = [(256, size_type, value, W), (257, size_type, value, H), (258, 3, "H2x", 8), (262, 3, "H2x", 1)]
    ifd = struct.pack(end + "H", len(entries))
    for tag, typ, fmt, v in entries:
        ifd += struct.pack(end + "HHI", tag, typ, 1) + struct.pack(end + fmt, v)
    head = (b"II*\x00" if order == "II" else b"MM\x00*") + struct.pack(end + "I", 8)
    return head + ifd + struct.pack(end + "I", 0) + bytes(W * H)


@pytest.mark.parametrize("order", ["II", "MM"], ids=["little-endian", "big-endian"])
@pytest.mark.parametrize("size_type", [3, 4], ids=["SHORT", "LONG"])
def test_tiff_size_comes_from_its_first_directory_in_either_byte_order(order, size_type):
    assert inspect(tiff_by_hand(order, size_type)) == ImageInfo("tiff", W, H)


def tiff_with_size_entry(tag: int, typ: int, count: int, values: tuple[int, ...]) -> bytes:
    """A greyscale TIFF by Pillow whose width (256) or height (257) entry is rewritten to hold ``count``
    values of ``typ``, stored after the image data where its value field points (``values``, 4 bytes each)."""
    data = save(Image.fromarray(pixels(channels=1)), "TIFF")
    (ifd,) = struct.unpack("<I", data[4:8])
    (n,) = struct.unpack("<H", data[ifd : ifd + 2])
    at = next(ifd + 2 + 12 * k for k in range(n) if struct.unpack("<H", data[ifd + 2 + 12 * k : ifd + 4 + 12 * k])[0] == tag)
    out = bytearray(data)
    out[at : at + 12] = struct.pack("<HHII", tag, typ, count, len(data))
    return bytes(out) + struct.pack(f"<{len(values)}I", *values)


@pytest.mark.parametrize("tag, typ, count", [(257, 4, 255), (257, 4, 2), (256, 3, 3), (257, 16, 1), (256, 12, 1)],
                         ids=["255-LONGs", "2-LONGs", "3-SHORTs", "LONG8", "DOUBLE"])
def test_tiff_size_of_more_than_one_value_or_another_type_is_refused(tag, typ, count):
    # Found by benchmarks/fuzz_images.py (--profile gpu-torch): with its count set to 255 the height's value
    # field became an offset; the check read it as the height (36) while PIL, the gpu-torch profile's decoder
    # for TIFF, read the value there (65539) and decoded a 52x65539 image past the aspect-ratio limit.
    data = tiff_with_size_entry(tag, typ, count, (16000, 16000, 0))
    assert "corrupt TIFF" in refused(data, what=f"a TIFF size of {count} values of type {typ}")


def test_tiff_written_by_pillow_in_either_byte_order():
    little = save(Image.fromarray(pixels()), "TIFF")
    big = save(Image.fromarray((pixels(channels=1) * np.uint16(257)).astype(">u2")), "TIFF")  # mode I;16B
    assert (little[:2], big[:2]) == (b"II", b"MM")
    assert inspect(little) == ImageInfo("tiff", W, H)
    assert inspect(big) == ImageInfo("tiff", W, H)


def webp(kind: str) -> bytes:
    if kind == "VP8 ":
        data = save(Image.fromarray(pixels()), "WEBP", quality=80)
    elif kind == "VP8L":
        data = save(Image.fromarray(pixels()), "WEBP", lossless=True)
    else:  # VP8X: the extended header, written when there is alpha (or metadata)
        data = save(Image.fromarray(pixels(channels=4)), "WEBP", quality=80)
    assert data[12:16] == kind.encode(), f"Pillow wrote a {data[12:16]!r} WebP, not {kind!r}"
    return data


@pytest.mark.parametrize("kind", ["VP8 ", "VP8L", "VP8X"], ids=["lossy", "lossless", "extended"])
def test_webp_size_comes_from_each_kind_of_header(kind):
    assert inspect(webp(kind)) == ImageInfo("webp", W, H)


@pytest.mark.parametrize("kind", ["VP8 ", "VP8L", "VP8X"], ids=["lossy", "lossless", "extended"])
def test_webp_with_a_truncated_header_is_refused(kind):
    data = webp(kind)
    assert "truncated WebP header" in refused(data[:24], what=f"a {kind!r} WebP header cut short")
    # The size is in the first 30 bytes: cut there, the file is refused for what is missing after them.
    assert "truncated WebP: its RIFF header declares" in refused(data[:30], what=f"a {kind!r} WebP of 30 bytes")


def test_webp_of_an_unknown_kind_is_refused():
    data = bytearray(webp("VP8 "))
    data[12:16] = b"VP9 "
    assert "corrupt WebP: unknown chunk" in refused(bytes(data))


def exif_bytes(orientation: int, order: str = "<") -> bytes:
    """A TIFF structure whose first directory holds only the orientation tag (SHORT)."""
    magic = b"II*\0" if order == "<" else b"MM\0*"
    return magic + struct.pack(order + "IH", 8, 1) + struct.pack(order + "HHIH2x", 0x0112, 3, 1, orientation) + b"\0" * 4


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_webp_orientation_comes_from_its_exif_chunk(orientation):
    data = save(Image.fromarray(pixels()), "WEBP", quality=80, exif=orientation_exif(orientation))
    assert data[12:16] == b"VP8X" and b"EXIF" in data
    assert webp_orientation(data) == orientation
    assert inspect(data) == ImageInfo("webp", W, H)


def test_webp_orientation_reads_either_byte_order_with_or_without_the_exif_prefix_and_survives_damage():
    plain = webp("VP8 ")
    assert webp_orientation(plain) == 1

    def with_chunk(payload: bytes) -> bytes:
        chunk = b"EXIF" + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) & 1)
        data = plain + chunk
        return data[:4] + struct.pack("<I", len(data) - 8) + data[8:]

    assert webp_orientation(with_chunk(exif_bytes(6, ">"))) == 6
    assert webp_orientation(with_chunk(b"Exif\0\0" + exif_bytes(8))) == 8
    assert webp_orientation(with_chunk(exif_bytes(6))[:-10]) == 1  # the chunk cut short: unreadable, upright
    assert webp_orientation(with_chunk(exif_bytes(42))) == 1  # not an orientation
    assert webp_orientation(with_chunk(b"\xff" * 7)) == 1


# --- what is refused -----------------------------------------------------------------------------------------


def test_empty_and_unknown_data_are_refused_naming_the_accepted_formats():
    assert "empty image" in refused(b"")
    message = refused(save(Image.fromarray(pixels()), "GIF"))
    assert "not a supported image" in message and "jpeg, png, bmp, tiff, webp" in message


def test_jpeg_cut_before_or_inside_its_frame_header_is_refused():
    data = jpeg()
    sof = data.find(b"\xff\xc0")
    for cut in (3, sof, sof + 6):
        assert "no frame header" in refused(data[:cut]), f"cut after {cut} bytes"


def test_jpeg_cut_in_its_scan_data_is_refused_as_truncated():
    message = refused(cut_in_scan_data(jpeg()), what="a JPEG cut in its scan data")
    assert "truncated JPEG: no end-of-image marker after the scan data" in message


def test_jpeg_cut_between_the_frame_header_and_the_scan_is_refused_as_truncated():
    data = jpeg()
    cut = data[: data.find(b"\xff\xda")]
    assert "truncated JPEG: the data ends before the scan data" in refused(cut)


def test_jpeg_with_bytes_after_its_end_marker_is_accepted():
    # Rows of a padded multi-image request end in zeros; cameras append data after the end of image too.
    assert inspect(jpeg() + bytes(100)) == ImageInfo("jpeg", W, H)


def test_jpeg_end_marker_in_a_comment_does_not_hide_truncated_scan_data():
    data = with_segment(jpeg(), com_segment(b"a comment that says \xff\xd9 (end of image) early"))
    assert inspect(data) == ImageInfo("jpeg", W, H)  # whole: accepted
    message = refused(cut_in_scan_data(data), what="a JPEG truncated in its scan data whose comment segment holds "
                      "FF D9: the end-of-image search must start after the headers, not at byte 0")
    assert "truncated JPEG" in message


def test_jpeg_end_marker_of_an_exif_thumbnail_does_not_hide_truncated_scan_data():
    thumbnail = jpeg(8, 6)
    data = with_segment(jpeg(), exif_with_thumbnail(thumbnail))
    # Pillow finds the thumbnail where cameras put it: IFD1's offset (from the TIFF header, 12 bytes in).
    ifd1 = Image.open(io.BytesIO(data)).getexif().get_ifd(ExifTags.IFD.IFD1)
    assert data[12 + ifd1[0x0201] :][: ifd1[0x0202]] == thumbnail
    assert inspect(data) == ImageInfo("jpeg", W, H)
    message = refused(cut_in_scan_data(data), what="a JPEG truncated in its scan data whose Exif thumbnail ends in "
                      "FF D9: the end-of-image search must start after the headers, not at byte 0")
    assert "truncated JPEG" in message


def test_jpeg_end_marker_before_any_scan_is_refused():
    data = jpeg()
    sos = data.find(b"\xff\xda")
    assert "end of image before any scan data" in refused(data[:sos] + b"\xff\xd9" + bytes(8))


def test_png_without_its_iend_chunk_is_refused_as_truncated():
    data = png()
    assert "truncated PNG: a chunk of" in refused(data[: len(data) // 2])  # cut inside its IDAT chunk
    assert "truncated PNG: no IEND chunk" in refused(data[: data.rfind(b"IEND") - 4])  # cut after it
    assert "corrupt PNG: no IHDR chunk" in refused(data[:20])


def test_bmp_and_tiff_cut_inside_their_headers_are_refused():
    assert "truncated BMP header" in refused(save(Image.fromarray(pixels()), "BMP")[:20])
    for order in ("II", "MM"):
        assert "corrupt TIFF: no image size" in refused(tiff_by_hand(order, 4)[:20])


@pytest.mark.parametrize("fmt", ["png", "bmp"])
def test_a_zero_sized_image_is_refused(fmt):
    data = bytearray(png() if fmt == "png" else save(Image.fromarray(pixels()), "BMP"))
    offset = 16 if fmt == "png" else 18
    data[offset : offset + 4] = bytes(4)  # width 0
    assert f"corrupt {fmt.upper()}: image size 0x{H}" in refused(bytes(data))


# --- the limits (spec.IMAGE_LIMITS) -------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (the check reads headers only, never pixels)."""
    data = bytearray(png())
    data[16:24] = struct.pack(">II", width, height)
    return bytes(data)


def test_byte_limit_accepts_max_bytes_and_refuses_one_more():
    data = png()
    at_limit = data + bytes(LIMITS.max_bytes - len(data))
    assert inspect(at_limit) == ImageInfo("png", W, H)
    message = refused(at_limit + b"\x00")
    assert f"image of {LIMITS.max_bytes + 1} bytes exceeds the limit of {LIMITS.max_bytes} bytes" in message


def test_side_limit_accepts_max_side_and_refuses_one_more():
    side = LIMITS.max_side
    # The short side is as short as the aspect-ratio limit allows, so only the side limit is in play.
    short = math.ceil(side / LIMITS.max_aspect_ratio)
    assert inspect(png_claiming(side, short)) == ImageInfo("png", side, short)
    assert inspect(png_claiming(short, side)) == ImageInfo("png", short, side)
    for width, height in ((side + 1, short + 1), (short + 1, side + 1)):
        assert f"exceeds the limit of {side} pixels a side" in refused(png_claiming(width, height))


def test_pixel_limit_accepts_max_pixels_and_refuses_one_row_more():
    width = 12_000
    height = LIMITS.max_pixels // width
    assert width * height == LIMITS.max_pixels and max(width, height) < LIMITS.max_side
    assert inspect(png_claiming(width, height)) == ImageInfo("png", width, height)
    message = refused(png_claiming(width, height + 1))
    assert f"{width}x{height + 1} pixels exceeds the limit" in message
    assert f"{LIMITS.max_pixels // 1_000_000} megapixels" in message


def test_a_format_left_out_of_the_accepted_formats_is_refused():
    only_jpeg = dataclasses.replace(LIMITS, formats=("jpeg",))
    assert inspect(jpeg(), only_jpeg) == ImageInfo("jpeg", W, H)
    assert "png images are not accepted: accepted formats are jpeg" in refused(png(), only_jpeg)
    assert set(LIMITS.formats) == {"jpeg", "png", "bmp", "tiff", "webp"}


def test_limits_are_taken_from_the_limits_passed():
    small = dataclasses.replace(LIMITS, max_bytes=len(png()), max_side=30, max_pixels=500)
    assert f"exceeds the limit of {len(png())} bytes" in refused(png() + b"\x00", small)
    assert "exceeds the limit of 30 pixels a side" in refused(png_claiming(31, 1), small)
    assert "exceeds the limit" in refused(png_claiming(25, 25), small)
    assert inspect(png_claiming(25, 20), small) == ImageInfo("png", 25, 20)


# --- a request's tensor ---------------------------------------------------------------------------------------


def test_rows_of_a_padded_request_are_checked_one_by_one():
    def request(*images: bytes) -> np.ndarray:
        rows = np.zeros((len(images), max(map(len, images))), dtype=np.uint8)
        for row, image in zip(rows, images):
            row[: len(image)] = np.frombuffer(image, np.uint8)
        return rows

    a, b = jpeg(), png(5, 7)
    assert inspect_rows(request(a, b)) == [ImageInfo("jpeg", W, H), ImageInfo("png", 5, 7)]
    assert inspect_rows(np.frombuffer(a, np.uint8)) == [ImageInfo("jpeg", W, H)]
    with pytest.raises(InvalidImage, match="truncated JPEG"):
        inspect_rows(request(b, cut_in_scan_data(a)))


# --- chunk lengths: what a parser allocates before it finds the file too short ------------------------------


def png_chunk(kind: bytes, body: bytes, length: int | None = None) -> bytes:
    """A PNG chunk holding ``body``, declaring ``length`` bytes (its own length unless given); a right CRC."""
    declared = len(body) if length is None else length
    return struct.pack(">I", declared) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with(chunk: bytes, before: bytes = b"IDAT") -> bytes:
    """png() with ``chunk`` inserted ahead of its first ``before`` chunk."""
    data = png()
    at = data.find(before) - 4
    return data[:at] + chunk + data[at:]


@pytest.mark.parametrize("kind, before", [(b"eXIf", b"IDAT"), (b"eXIf", b"IEND"), (b"PLTE", b"IDAT"),
                                          (b"IDAT", b"IDAT"), (b"tEXt", b"IEND")])
def test_png_chunk_declaring_more_bytes_than_the_file_holds_is_refused(kind, before):
    # A 2 GB length in a file of a few hundred bytes: DALI 2.4's PNG parser allocated the declared size of an
    # eXIf, PLTE or IDAT chunk (2 GiB and 2.5 s per image) before it found the data missing.
    data = png_with(png_chunk(kind, b"MM\0*\0\0\0\x08", length=0x7FFFFFF0), before)
    assert "runs past the end of the file" in refused(data, what=f"a {kind!r} chunk of 2 GB in {len(data)} bytes")


def test_png_whose_iend_comes_before_its_image_data_is_refused():
    # Found by benchmarks/fuzz_images.py: with IEND ahead of any IDAT the decoder read on past it, and
    # allocated the 4 GiB an IDAT chunk there declared. After a real IEND nothing is read (padded rows).
    data = png()
    ihdr_end = 8 + 25
    early_end = data[:ihdr_end] + png_chunk(b"IEND", b"") + png_chunk(b"IDAT", bytes(16), length=0xFFFFFFF0)
    assert "IEND chunk before any image data" in refused(early_end)
    assert inspect(data + png_chunk(b"IDAT", bytes(16), length=0xFFFFFFF0)) == ImageInfo("png", W, H)


def test_png_with_many_chunks_and_a_chunk_of_its_own_is_accepted():
    # The walk over the chunks goes past ancillary chunks and an image split into one IDAT per byte.
    data = png()
    start = data.find(b"IDAT") - 4
    (length,) = struct.unpack(">I", data[start : start + 4])
    idat = data[start + 8 : start + 8 + length]
    split = b"".join(png_chunk(b"IDAT", idat[k : k + 1]) for k in range(len(idat)))
    data = data[:start] + png_chunk(b"tEXt", b"Comment\0hi") + png_chunk(b"abCd", b"x" * 3) + split \
        + data[start + 12 + length :]
    assert inspect(data) == ImageInfo("png", W, H)
    assert inspect(data + bytes(100)) == ImageInfo("png", W, H)  # a padded row of a request


def test_png_of_more_chunks_than_any_encoder_writes_is_refused_without_walking_them_all():
    empty = png_chunk(b"tEXt", b"")
    data = png_with(empty * 300_000, b"IEND")
    assert "chunks" in refused(data, what="a PNG of 300000 empty chunks")


def webp_with_exif() -> bytes:
    data = save(Image.fromarray(pixels()), "WEBP", quality=80, exif=orientation_exif(6))
    assert data[12:16] == b"VP8X" and b"EXIF" in data
    return data


def webp_chunk_size_at(data: bytes, fourcc: bytes) -> int:
    """The offset of the size field of the first RIFF chunk ``fourcc`` of a WebP."""
    pos = 12
    while data[pos : pos + 4] != fourcc:
        pos += 8 + int.from_bytes(data[pos + 4 : pos + 8], "little") + (data[pos + 4] & 1)
    return pos + 4


@pytest.mark.parametrize("fourcc", [b"EXIF", b"VP8 "])
@pytest.mark.parametrize("size", [0x40000000, 0xFFFFFFF0], ids=["1GiB", "4GiB"])
def test_webp_chunk_declaring_more_bytes_than_the_file_holds_is_refused(fourcc, size):
    # Found by benchmarks/fuzz_images.py: one bit flipped in the size of the EXIF chunk of a 694-byte WebP
    # made DALI 2.4's WebP parser allocate 1 GiB before it failed; 0xFFFFFFF0 took 4 GiB and 20 s.
    data = bytearray(webp_with_exif())
    at = webp_chunk_size_at(bytes(data), fourcc)
    data[at : at + 4] = struct.pack("<I", size)
    assert "runs past the end of the file" in refused(bytes(data), what=f"a {fourcc!r} chunk of {size} bytes")


def test_webp_chunk_after_its_riff_data_is_walked_too():
    # The parser looks for the EXIF chunk the VP8X header announces past the RIFF data as well: moved there,
    # declaring 0xFFFFFFF0 bytes, it cost 4 GiB. Zero padding there (a request's padded row) is not walked.
    data = webp_with_exif()
    at = webp_chunk_size_at(data, b"EXIF") - 4
    riff = data[:at]
    riff = riff[:4] + struct.pack("<I", len(riff) - 8) + riff[8:]
    exif = data[at:]
    moved = riff + exif[:4] + struct.pack("<I", 0xFFFFFFF0) + exif[8:]
    assert "runs past the end of the file" in refused(moved, what="an EXIF chunk of 4 GiB after the RIFF data")
    assert inspect(riff + exif) == ImageInfo("webp", W, H)  # the same chunk, of its true size
    assert inspect(riff + bytes(1000)) == ImageInfo("webp", W, H)


def test_webp_whose_riff_size_exceeds_the_file_is_refused_as_truncated():
    data = webp_with_exif()
    assert "truncated WebP" in refused(data[:-20])
    assert inspect(data + bytes(64)) == ImageInfo("webp", W, H)  # a padded row of a request
    animated = save(Image.fromarray(pixels()), "WEBP", save_all=True,
                    append_images=[Image.fromarray(pixels()[::-1])], duration=50)
    assert inspect(animated) == ImageInfo("webp", W, H)

"""Mutation fuzzing of the image intake: the header check, then the decode the preprocess step runs.

Seeds are small valid images of every format Pillow writes (and a few it cannot, built by hand: Adam7
interlaced and 16-bit RGB PNGs), mutated deterministically from ``--seed``: bit flips, byte insertion and
deletion, chunk/segment/IFD-entry splicing, header fields overwritten with boundary values, truncation,
and dimensions set large in a small file. Each case goes through what ``preprocess`` does with an upload
(:func:`tritonvision_server.imagecheck.inspect`, then :meth:`CpuPreprocessor.run_requests`) in a worker
process the parent watches: a crash, a hang (``--hang`` seconds) or the worker's memory over ``--rss-cap``
kills it, is recorded with the case's bytes, and a new worker goes on. The invariant:

* a case is refused by the header check (``InvalidImage``) or by the decoder (``DecodeError``), or decodes
  to ``[1, 3, crop, crop]`` finite pixels, within ``--timeout`` seconds of the step; any other exception is
  a fault (the step would fail its whole batch with it);
* an accepted image decodes within the limits: the decoder's shape and the shape the graph's resize is
  computed from (``peek_image_shape``) are within ``IMAGE_LIMITS`` (side, pixels, aspect ratio);
* a case's peak RSS (``VmHWM``, reset before each case) stays within ``--bytes-per-pixel`` bytes per pixel
  of the header's size, plus ``--rss-slack`` MiB, over its value at the case's start.

``--profile gpu-torch`` fuzzes the gpu-torch profile's step instead (:func:`torch_pipeline.preprocess_runs`, on
the CPU: libjpeg for JPEG where a GPU has nvJPEG, PIL for the other formats on both).

Then, with ``--server N``, N of the cases (every fault, each format's heaviest and slowest accepted case,
then other accepted ones, then a sample of the refused) go to the real server of ``--profile`` (gpu-torch: its
repository built for the CPU device, as ``tests/test_gpu_torch.py`` builds it, random seed-0 weights), each
among three valid photos sent at once (one dynamic batch): the photos must classify as they do alone, the
hostile image must fail alone with ``InvalidImageError`` and the refusal message (``image refused
(header|decode): ...``), or classify where the step decoded it in process, the server must stay up, and
every python-backend stub's RSS must stay under ``--rss-cap``.

``--rounds N`` then sends each format's costliest accepted cases, and a crafted PNG that fails late in its
decode (:func:`damaged_near_the_end`), N times more, each as above, and reads the preprocess stubs' memory
(VmRSS, RssAnon, RssFile, RssShmem) when idle, after each round; the baseline is read after the photos and one
small image of every format (the decoders' one-time set-up). A plateau over rounds 2..N is memory kept for
reuse; a least-squares slope over ``--max-growth`` MiB a round is reported as a fault (growth: a leak).
``--glibc-malloc`` serves with glibc's default malloc settings instead of the launcher's.

Prints a table per format and writes ``results/fuzz_images.json``; faulty inputs are written under
``--save-dir`` (``results/fuzz_images/``). Exits 1 when it found a fault.

    .venv/bin/python benchmarks/fuzz_images.py [--cases 2500] [--seed 0] [--server 60] [--profile gpu-torch]
        [--rounds 8] [--glibc-malloc]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import multiprocessing
import random
import re
import struct
import sys
import threading
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import hardware, proc_status

log = logging.getLogger("fuzz_images")

MiB = 2**20

# --- seeds ---------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_by_hand(pixels: np.ndarray, *, interlaced: bool = False) -> bytes:
    """A PNG of ``pixels`` (HxW, HxWx3 or HxWx4; uint8 or big-endian-stored uint16), which Pillow cannot
    write when it is interlaced or 16-bit colour. Filter 0 on every row."""
    h, w = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    depth = 16 if pixels.dtype == np.uint16 else 8
    colour = {1: 0, 3: 2, 4: 6}[channels]
    stored = pixels.astype(">u2") if depth == 16 else pixels

    def rows(img):
        return b"".join(b"\0" + img[y].tobytes() for y in range(img.shape[0]))

    if interlaced:
        raw = b"".join(rows(stored[y0::dy, x0::dx]) for x0, y0, dx, dy in _ADAM7 if y0 < h and x0 < w)
    else:
        raw = rows(stored)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 1 if interlaced else 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw, 9))
            + _png_chunk(b"IEND", b""))


def seeds() -> list[tuple[str, str, bytes]]:
    """``(name, format, bytes)`` of every seed: small images of each format in various modes and encodings."""
    from PIL import Image

    rng = np.random.RandomState(0)
    h, w = 36, 52
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 4, yy * 6, (xx + yy) * 3], -1).astype(np.uint8) ^ rng.randint(0, 32, (h, w, 3), dtype=np.uint8)
    base = Image.fromarray(rgb, "RGB")
    exif = Image.Exif()
    exif[0x0112] = 6

    def save(image, fmt, **kw):
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        return buf.getvalue()

    frames = [Image.fromarray(np.roll(rgb, 8 * k, axis=1), "RGB") for k in range(3)]
    out = [
        ("jpeg-baseline", "jpeg", save(base, "JPEG", quality=85)),
        ("jpeg-progressive", "jpeg", save(base, "JPEG", quality=85, progressive=True)),
        ("jpeg-grey", "jpeg", save(base.convert("L"), "JPEG")),
        ("jpeg-cmyk", "jpeg", save(base.convert("CMYK"), "JPEG")),
        ("jpeg-exif-rot", "jpeg", save(base, "JPEG", exif=exif.tobytes())),
        ("jpeg-444", "jpeg", save(base, "JPEG", subsampling=0, quality=95)),
        ("png-rgb", "png", save(base, "PNG")),
        ("png-rgba", "png", save(base.convert("RGBA"), "PNG")),
        ("png-grey", "png", save(base.convert("L"), "PNG")),
        ("png-palette", "png", save(base.convert("P"), "PNG")),
        ("png-grey16", "png", save(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG")),
        ("png-rgb16", "png", png_by_hand(rgb.astype(np.uint16) * 257)),
        ("png-interlaced", "png", png_by_hand(rgb, interlaced=True)),
        ("png-interlaced-rgba16", "png",
         png_by_hand(np.dstack([rgb, rgb[..., :1]]).astype(np.uint16) * 257, interlaced=True)),
        ("gif", "gif", save(base.convert("P"), "GIF")),
        ("gif-animated", "gif", save(frames[0].convert("P"), "GIF", save_all=True,
                                     append_images=[f.convert("P") for f in frames[1:]], duration=50, loop=0)),
        ("webp-lossy", "webp", save(base, "WEBP", quality=80)),
        ("webp-lossless", "webp", save(base, "WEBP", lossless=True)),
        ("webp-alpha", "webp", save(base.convert("RGBA"), "WEBP", quality=80)),
        ("webp-exif-rot", "webp", save(base, "WEBP", exif=exif.tobytes())),
        ("webp-animated", "webp", save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=50)),
        ("bmp-rgb", "bmp", save(base, "BMP")),
        ("bmp-palette", "bmp", save(base.convert("P"), "BMP")),
        ("bmp-1bit", "bmp", save(base.convert("1"), "BMP")),
        ("bmp-rgba", "bmp", save(base.convert("RGBA"), "BMP")),
        ("tiff-raw", "tiff", save(base, "TIFF")),
        ("tiff-lzw", "tiff", save(base, "TIFF", compression="tiff_lzw")),
        ("tiff-deflate", "tiff", save(base, "TIFF", compression="tiff_adobe_deflate")),
        ("tiff-packbits", "tiff", save(base, "TIFF", compression="packbits")),
        ("tiff-jpeg", "tiff", save(base, "TIFF", compression="jpeg")),
        ("tiff-grey16", "tiff", save(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "TIFF")),
        ("tiff-cmyk", "tiff", save(base.convert("CMYK"), "TIFF")),
        ("tiff-palette", "tiff", save(base.convert("P"), "TIFF", compression="tiff_lzw")),
    ]
    return out


# --- structure of each format, for the mutations that know it -----------------------------------------


def units(data: bytes, fmt: str) -> list[tuple[int, int]]:
    """``(start, end)`` of the structural units of a file: JPEG marker segments (the scan with its data as
    one), PNG chunks, RIFF chunks, TIFF first-directory entries; empty where none are found."""
    out = []
    try:
        if fmt == "jpeg":
            i = 2
            while i + 4 <= len(data) and data[i] == 0xFF:
                (length,) = struct.unpack(">H", data[i + 2 : i + 4])
                if data[i + 1] == 0xDA:
                    end = data.rfind(b"\xff\xd9")
                    out.append((i, end if end > i else len(data)))
                    break
                out.append((i, i + 2 + length))
                i += 2 + length
        elif fmt == "png":
            i = 8
            while i + 12 <= len(data):
                (length,) = struct.unpack(">I", data[i : i + 4])
                out.append((i, min(len(data), i + 12 + length)))
                i += 12 + length
        elif fmt == "webp":
            i = 12
            while i + 8 <= len(data):
                size = int.from_bytes(data[i + 4 : i + 8], "little")
                out.append((i, min(len(data), i + 8 + size + (size & 1))))
                i += 8 + size + (size & 1)
        elif fmt == "tiff":
            end = "<" if data[:2] == b"II" else ">"
            (ifd,) = struct.unpack(end + "I", data[4:8])
            (count,) = struct.unpack(end + "H", data[ifd : ifd + 2])
            out = [(ifd + 2 + 12 * k, ifd + 14 + 12 * k) for k in range(count) if ifd + 14 + 12 * k <= len(data)]
    except struct.error:
        pass
    return [u for u in out if u[1] > u[0]]


def size_fields(data: bytes, fmt: str) -> list[tuple[int, str, str]]:
    """``(offset, struct format, which)`` of the fields that hold the image size (``which``: w or h)."""
    if fmt == "jpeg":
        for start, _ in units(data, fmt):
            marker = data[start + 1]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                return [(start + 7, ">H", "w"), (start + 5, ">H", "h")]
        return []
    if fmt == "png":
        return [(16, ">I", "w"), (20, ">I", "h")]
    if fmt == "bmp":
        return [(18, "<i", "w"), (22, "<i", "h")]
    if fmt == "gif":
        return [(6, "<H", "w"), (8, "<H", "h")]
    if fmt == "webp":
        chunk = data[12:16]
        if chunk == b"VP8X":
            return [(24, "<I3", "w"), (27, "<I3", "h")]
        if chunk == b"VP8 ":
            return [(26, "<H", "w"), (28, "<H", "h")]
        return []  # VP8L: 14-bit fields, see _set_vp8l
    if fmt == "tiff":
        end = "<" if data[:2] == b"II" else ">"
        fields = []
        for start, _ in units(data, fmt):
            tag, typ = struct.unpack(end + "HH", data[start : start + 4])
            if tag in (256, 257):
                fields.append((start + 8, end + ("H" if typ == 3 else "I"), "w" if tag == 256 else "h"))
        return fields
    return []


def _put(buf: bytearray, offset: int, fmt: str, value: int) -> None:
    if fmt.endswith("3"):  # 24-bit little-endian, stored minus one (WebP VP8X canvas)
        buf[offset : offset + 3] = ((value - 1) & 0xFFFFFF).to_bytes(3, "little")
        return
    width = struct.calcsize(fmt)
    if offset + width > len(buf):
        return
    kind = fmt[-1]
    if kind in "hil":
        bits = 8 * width
        value &= (1 << bits) - 1
        value = value - (1 << bits) if value >= 1 << (bits - 1) else value
    else:
        value &= (1 << (8 * width)) - 1
    struct.pack_into(fmt, buf, offset, value)


def fix_png_crcs(data: bytes) -> bytes:
    """The PNG with every chunk's CRC recomputed, so that the decoder gets past its CRC check."""
    buf = bytearray(data)
    for start, end in units(data, "png"):
        (length,) = struct.unpack(">I", data[start : start + 4])
        if start + 12 + length <= len(buf):
            struct.pack_into(">I", buf, start + 8 + length, zlib.crc32(bytes(buf[start + 4 : start + 8 + length])))
    return bytes(buf)


# --- mutations -----------------------------------------------------------------------------------------

BOUNDARY = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x3FFF, 0x4000, 0x7FFF, 0x8000, 0xFFFF, 0x10000, 0x7FFFFFFF,
            0x80000000, 0xFFFFFFFF)
# Large sizes (width, height): past the limits, at them, and under them with far more pixels than the file.
LARGE = ((16384, 16384), (16385, 600), (16384, 512), (10954, 10954), (12000, 10000), (10000, 10000), (8000, 6000),
         (4000, 3000), (65535, 65535), (0x7FFFFFFF, 1), (512, 16384), (20000, 20000), (3, 16384))


def _pos(rng: random.Random, data: bytes) -> int:
    # Half the time in the first 128 bytes, where the headers are.
    return rng.randrange(min(len(data), 128) if rng.random() < 0.5 else len(data))


def m_bitflip(rng, data, fmt, pool):
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        buf[_pos(rng, data)] ^= 1 << rng.randrange(8)
    return bytes(buf)


def m_insert(rng, data, fmt, pool):
    at = _pos(rng, data)
    n = rng.choice((1, 2, 4, 16, 64))
    blob = rng.choice((bytes(rng.randrange(256) for _ in range(n)), b"\0" * n, b"\xff" * n))
    return data[:at] + blob + data[at:]


def m_delete(rng, data, fmt, pool):
    at = _pos(rng, data)
    return data[:at] + data[at + rng.choice((1, 2, 4, 16, 64)) :]


def m_splice(rng, data, fmt, pool):
    mine = units(data, fmt)
    if not mine:
        return m_insert(rng, data, fmt, pool)
    a, b = rng.choice(mine)
    op = rng.choice(("duplicate", "drop", "swap", "foreign"))
    if op == "duplicate":
        return data[:b] + data[a:b] + data[b:]
    if op == "drop":
        return data[:a] + data[b:]
    if op == "swap" and len(mine) > 1:
        c, d = rng.choice([u for u in mine if u != (a, b)])
        (a, b), (c, d) = sorted([(a, b), (c, d)])
        if b <= c:
            return data[:a] + data[c:d] + data[b:c] + data[a:b] + data[d:]
    other = rng.choice([d for _, f, d in pool if f == fmt] or [data])
    theirs = units(other, fmt) or [(0, len(other))]
    c, d = rng.choice(theirs)
    return data[:a] + other[c:d] + data[a:]


def m_overwrite(rng, data, fmt, pool):
    buf = bytearray(data)
    fields = size_fields(data, fmt)
    end = ">" if fmt in ("jpeg", "png") or data[:2] == b"MM" else "<"
    if fields and rng.random() < 0.5:
        offset, field, _ = rng.choice(fields)
    else:
        field = end + rng.choice("BHI")
        offset = rng.randrange(max(1, min(len(data), 64) - struct.calcsize(field)))
    _put(buf, offset, field, rng.choice(BOUNDARY))
    return bytes(buf)


def m_truncate(rng, data, fmt, pool):
    if len(data) < 2:
        return data
    return data[: rng.choice((rng.randrange(1, len(data)), len(data) - rng.randint(1, 16), rng.randint(1, 64)))]


def m_length(rng, data, fmt, pool):
    """A length or count field (a chunk's size, a segment's length, a directory entry's count, BMP's offsets
    and sizes) set to a boundary value: what a parser that trusts it allocates."""
    end = "<" if data[:2] == b"II" else ">"
    fields = {
        "png": [(a, ">I") for a, _ in units(data, fmt)],
        "webp": [(4, "<I")] + [(a + 4, "<I") for a, _ in units(data, fmt)],
        "jpeg": [(a + 2, ">H") for a, _ in units(data, fmt)],
        "tiff": [(a + 4, end + "I") for a, _ in units(data, fmt)],
        "bmp": [(2, "<I"), (10, "<I"), (14, "<I"), (34, "<I"), (46, "<I")],
    }.get(fmt)
    if not fields:
        return m_overwrite(rng, data, fmt, pool)
    buf = bytearray(data)
    offset, field = rng.choice(fields)
    value = rng.choice(BOUNDARY + (len(data), len(data) + 1, 0x40000000))
    _put(buf, offset, field, value)
    return bytes(buf)


def _set_vp8l(buf: bytearray, w: int, h: int) -> None:
    bits = int.from_bytes(buf[21:25], "little")
    bits = (bits & ~((1 << 28) - 1)) | ((w - 1) & 0x3FFF) | (((h - 1) & 0x3FFF) << 14)
    buf[21:25] = bits.to_bytes(4, "little")


def m_enlarge(rng, data, fmt, pool):
    w, h = rng.choice(LARGE)
    if rng.random() < 0.3:
        w, h = h, w
    buf = bytearray(data)
    fields = size_fields(data, fmt)
    if fmt == "webp" and data[12:16] == b"VP8L":
        _set_vp8l(buf, w, h)
    for offset, field, which in fields:
        _put(buf, offset, field, w if which == "w" else h)
    return bytes(buf)


MUTATIONS = {"bitflip": m_bitflip, "insert": m_insert, "delete": m_delete, "splice": m_splice,
             "overwrite": m_overwrite, "length": m_length, "truncate": m_truncate, "enlarge": m_enlarge}


def make_cases(n: int, seed: int) -> list[dict]:
    """``n`` cases, the same for the same ``seed``: the seeds themselves first, then mutants, the seeds taken
    in turn so that every format gets its share."""
    pool = seeds()
    rng = random.Random(seed)
    cases = [{"seed": name, "format": fmt, "mutations": [], "data": data} for name, fmt, data in pool][:n]
    names = list(MUTATIONS)
    while len(cases) < n:
        name, fmt, data = pool[len(cases) % len(pool)]
        applied = []
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            op = rng.choice(names)
            data = MUTATIONS[op](rng, data, fmt, pool) or data[:1]
            applied.append(op)
        if fmt == "png" and rng.random() < 0.7:
            data = fix_png_crcs(data)
            applied.append("crc")
        cases.append({"seed": name, "format": fmt, "mutations": applied, "data": data})
    return cases


# --- the worker: the step's own code, in its own process -----------------------------------------------


def within_limits(width: int, height: int, limits) -> bool:
    return (0 < width <= limits.max_side and 0 < height <= limits.max_side and width * height <= limits.max_pixels
            and max(width, height) <= limits.max_aspect_ratio * min(width, height))


def _rss(field: str) -> int:
    return proc_status("self", field)[field]


def _probe_pipeline():
    """Decode alone, as the graph does, returning the decoded shape and the peeked one (the resize's input)."""
    from nvidia.dali import fn, pipeline_def, types
    from tritonvision_server.dali_graph import orientation_aware_ops

    @pipeline_def(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_async=False,
                  exec_pipelined=False)
    def probe():
        decode, peek = orientation_aware_ops()
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, device="cpu")
        images = decode(encoded, device="cpu", output_type=types.RGB, adjust_orientation=True)
        return fn.shapes(images), peek(encoded, dtype=types.INT64, adjust_orientation=True)

    pipe = probe()
    pipe.build()
    return pipe


def check_case(data: bytes, pre, limits, bytes_per_pixel: float, slack: int, step_timeout: float) -> dict:
    """Everything the worker learns about one case (see the module docstring for the invariant)."""
    from tritonvision import spec
    from tritonvision_server.imagecheck import InvalidImage, inspect, webp_orientation

    with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM: the peak below is this case's
        fh.write("5")
    # The reset value, not VmRSS: the two can differ by hundreds of MiB just after the reset (seen after a
    # large case), which read as a case's own growth.
    before = _rss("VmHWM")
    started = time.perf_counter()
    out: dict = {"outcome": None, "fault": None}
    try:
        info = inspect(data)
        if info.format == "webp":
            webp_orientation(data)  # what the gpu profile's validate step adds
    except InvalidImage as exc:
        out.update(outcome="refused-header", message=str(exc))
    except Exception as exc:  # noqa: BLE001 - the finding
        out.update(outcome="fault", fault=f"header check raised {type(exc).__name__}: {exc}")
    if out["outcome"] is None:
        out.update(width=info.width, height=info.height)
        try:
            step = time.perf_counter()
            result = pre.step(data, info.width * info.height)
            out["step_seconds"] = time.perf_counter() - step
        except Exception as exc:  # noqa: BLE001
            out.update(outcome="fault", fault=f"preprocess raised {type(exc).__name__}: {exc}")
        else:
            crop = spec.PREPROCESSING.crop
            if isinstance(result, Exception):
                out.update(outcome="refused-decode", message=str(result)[:300])
            elif result.shape != (1, 3, crop, crop) or not np.isfinite(result).all():
                out.update(outcome="fault", fault=f"preprocess returned shape {result.shape}, finite "
                                                  f"{bool(np.isfinite(result).all())}")
            else:
                out["outcome"] = "decoded"
        if out["outcome"] == "decoded":
            try:
                (dw, dh), (pw, ph) = pre.sizes(data)
            except Exception as exc:  # noqa: BLE001 - the step decoded it; the probe alone failing is odd
                out.update(outcome="fault", fault=f"decoded by preprocess but not by the probe: {exc}"[:400])
            else:
                out.update(decoded=[dw, dh], peeked=[pw, ph])
                header = {(info.width, info.height), (info.height, info.width)}  # EXIF may turn it
                if (dw, dh) not in header or (pw, ph) not in header:
                    out["mismatch"] = True
                for what, (w, h) in (("decoded", (dw, dh)), ("peeked", (pw, ph))):
                    if not within_limits(w, h, limits):
                        out.update(outcome="fault", fault=f"header check accepted {info.width}x{info.height}; "
                                                          f"{what} size {w}x{h} is outside the limits")
    out["seconds"] = time.perf_counter() - started
    if out.get("step_seconds", 0.0) > step_timeout and out["fault"] is None:
        out.update(outcome="fault", fault=f"preprocess took {out['step_seconds']:.1f} s")
    peak = _rss("VmHWM")
    out["peak_rss_mib"] = peak / MiB
    out["case_rss_mib"] = (peak - before) / MiB
    allowed = bytes_per_pixel * out.get("width", 0) * out.get("height", 0) + slack * MiB
    if peak - before > allowed and out["fault"] is None:
        out.update(outcome="fault", fault=f"peak RSS {(peak - before) / MiB:.0f} MiB over the case's start, "
                                          f"allowed {allowed / MiB:.0f} MiB for its header size")
    return out


class CpuStep:
    """The cpu profile's preprocess: :meth:`CpuPreprocessor.run_requests` (DALI on the CPU)."""

    def __init__(self):
        from tritonvision import spec
        from tritonvision_server.pipeline import CpuPreprocessor

        self.pre = CpuPreprocessor(max_batch_size=spec.CPU.preprocess.batching.max_batch_size,
                                   num_threads=spec.CPU.cpu_threads)
        self.probe = _probe_pipeline()

    def step(self, data: bytes, pixels: int):
        """``[1, 3, crop, crop]`` pixels, or the decoder's refusal (an exception, returned)."""
        (result,) = self.pre.run_requests([[np.frombuffer(data, np.uint8)]], pixels=[[pixels]])
        return result

    def sizes(self, data: bytes) -> tuple[tuple[int, int], tuple[int, int]]:
        """(width, height) decoded and as the resize's input sees it (peeked)."""
        try:
            self.probe.feed_input("encoded", [np.frombuffer(data, np.uint8)])
            shape, peeked = self.probe.run()
        except Exception:
            self.probe = _probe_pipeline()
            raise
        dh, dw = (int(v) for v in np.asarray(shape.at(0))[:2])
        ph, pw = (int(v) for v in np.asarray(peeked.at(0))[:2])
        return (dw, dh), (pw, ph)


class TorchStep:
    """The gpu-torch profile's preprocess (:func:`torch_pipeline.preprocess_runs`), run on the CPU: its JPEG
    decoder is libjpeg there (nvJPEG on a GPU), its other formats PIL on both."""

    def __init__(self):
        from tritonvision_server import torch_pipeline as tp

        self.tp = tp
        self.normalise = tp.Normaliser("cpu", tp.torch.float32)

    def step(self, data: bytes, pixels: int):
        with self.tp.torch.inference_mode():
            out, where = self.tp.preprocess_runs([np.frombuffer(data, np.uint8)], [pixels], "cpu", self.normalise)
        return where[0] if isinstance(where[0], Exception) else out.numpy()

    def sizes(self, data: bytes) -> tuple[tuple[int, int], tuple[int, int]]:
        (image,) = self.tp.decode([np.frombuffer(data, np.uint8)], "cpu")
        if isinstance(image, Exception):
            raise image
        _, h, w = image.shape
        return (w, h), (w, h)  # the resize reads the decoded tensor's own size


STEPS = {"cpu": CpuStep, "gpu-torch": TorchStep}


def _warm_up(pre) -> None:
    """One valid image of each format through the step first: the decoders' and PyTorch's one-time set-up
    (~200 MiB) would otherwise count against the first case's memory allowance."""
    from PIL import Image

    image = Image.new("RGB", (64, 48), (90, 140, 200))
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "TIFF"):
        buf = io.BytesIO()
        image.save(buf, fmt)
        pre.step(buf.getvalue(), 64 * 48)
        pre.sizes(buf.getvalue())


def worker(conn, profile: str, bytes_per_pixel: float, slack: int, step_timeout: float) -> None:
    import os

    # The decoders (libtiff, OpenCV, nvImageCodec) print a line for most damaged files.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    logging.disable(logging.WARNING)
    from tritonvision import spec

    pre = STEPS[profile]()
    _warm_up(pre)
    conn.send("ready")
    while True:
        item = conn.recv()
        if item is None:
            return
        conn.send(check_case(item, pre, spec.IMAGE_LIMITS, bytes_per_pixel, slack, step_timeout))


class Worker:
    """The worker process, restarted after it crashed or was killed."""

    def __init__(self, args):
        self.args = args
        self.ctx = multiprocessing.get_context("spawn")
        self.proc = None
        self.starts = 0

    def start(self):
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=worker, args=(child, self.args.profile, self.args.bytes_per_pixel, self.args.rss_slack,
                                           self.args.timeout),
                                     daemon=True)
        self.proc.start()
        child.close()
        self.starts += 1
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise RuntimeError("the fuzzing worker did not start")

    def run(self, data: bytes) -> dict:
        if self.proc is None or not self.proc.is_alive():
            self.start()
        started = time.monotonic()
        self.conn.send(data)
        peak = 0
        while True:
            if self.conn.poll(0.02):
                try:
                    return self.conn.recv()
                except EOFError:
                    pass
            if not self.proc.is_alive():
                self.proc.join()
                code = self.proc.exitcode
                self.proc = None
                return {"outcome": "fault", "fault": f"worker died (exit code {code})",
                        "seconds": time.monotonic() - started, "peak_rss_mib": peak / MiB}
            try:
                peak = max(peak, proc_status(self.proc.pid, "VmRSS")["VmRSS"])
            except (OSError, KeyError):
                pass
            elapsed = time.monotonic() - started
            # The case's own time is checked in the worker (the preprocess step's share); this catches a hang.
            why = (f"over the {self.args.hang:g} s hang timeout" if elapsed > self.args.hang else
                   f"worker RSS {peak / MiB:.0f} MiB over the {self.args.rss_cap} MiB cap"
                   if peak > self.args.rss_cap * MiB else None)
            if why:
                self.proc.kill()
                self.proc.join()
                self.proc = None
                return {"outcome": "fault", "fault": f"killed: {why}", "seconds": elapsed, "peak_rss_mib": peak / MiB}

    def close(self):
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()


def fuzz(cases: list[dict], args) -> None:
    """Run every case through the worker, recording its result in the case."""
    from tqdm import tqdm

    w = Worker(args)
    try:
        for case in tqdm(cases, desc="in process", unit="case", disable=not args.progress, mininterval=2):
            case["result"] = w.run(case["data"])
    finally:
        w.close()
    args.worker_starts = getattr(args, "worker_starts", 0) + w.starts


# --- the real server -----------------------------------------------------------------------------------


def costliest(cases: list[dict]) -> list[dict]:
    """Each format's costliest accepted cases: the heaviest and the slowest in process (what tests the stubs'
    memory), in format order, each once."""
    accepted = [c for c in cases if c["result"]["outcome"] in ("decoded", "refused-decode")]
    out = []
    for fmt in sorted({c["format"] for c in accepted}):
        group = [c for c in accepted if c["format"] == fmt]
        for key in ("case_rss_mib", "step_seconds"):
            top = max(group, key=lambda c: c["result"].get(key, 0.0))
            if all(top is not c for c in out):
                out.append(top)
    return out


def damaged_near_the_end(width: int = 10000, height: int = 12000) -> bytes:
    """A PNG of one colour at the pixel limit (0.4 MB) whose compressed data is zeroed near its end: the decoder
    fills most of the image before it fails. Mutating 52x36 seeds does not reach such a case: what a failed
    decode leaves behind is measured with it in ``--rounds``."""
    raw = zlib.compress(b"".join(b"\0" + bytes([7]) * (3 * width) for _ in range(height)), 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", raw[:-50] + bytes(50))
            + _png_chunk(b"IEND", b""))


def crafted_cases(start: int) -> list[dict]:
    """Hand-made costly cases, numbered from ``start``, that ``--rounds`` repeats with the costliest fuzzed ones."""
    return [{"index": start, "seed": "png-damaged-near-the-end", "format": "png", "mutations": ["crafted"],
             "data": damaged_near_the_end()}]


def server_sample(cases: list[dict], n: int, rng: random.Random) -> list[dict]:
    """Every fault, then each format's costliest accepted cases (:func:`costliest`), then the other cases the
    header check accepted, then refused ones: ``n`` in all, in every format."""
    faults = [c for c in cases if c["result"]["outcome"] == "fault"]
    accepted = [c for c in cases if c["result"]["outcome"] in ("decoded", "refused-decode")]
    refused = [c for c in cases if c["result"]["outcome"] == "refused-header"]
    top = costliest(cases)
    accepted = [c for c in accepted if all(c is not t for t in top)]
    rng.shuffle(accepted)
    rng.shuffle(refused)
    picked = faults[:n]
    picked += top[: max(0, n - len(picked))]
    picked += accepted[: max(0, (n - len(picked)) * 2 // 3)]
    picked += refused[: max(0, n - len(picked))]
    return picked[:n]


def serve_repository(profile: str) -> tuple[Path, str, float]:
    """The repository the server pass serves for ``profile`` (gpu-torch: on the CPU device), its log file, and
    its start-up timeout. The weights are the tests' (random, seed 0)."""
    from tritonvision import spec
    from tritonvision_server.configs import write_repository

    if profile == "gpu-torch":
        from tritonvision_server.build_engines import build_gpu_torch_repository

        repo = build_gpu_torch_repository(BUILD / "model_repository_gpu_torch_cpu_fuzz", "random:0", device="cpu",
                                          state_dict=BUILD / "resnet50_state_dict.pt")
        return repo, "tritonserver_fuzz_gpu_torch.log", 240.0
    from tritonvision_server.onnx_export import export_onnx

    onnx = export_onnx(BUILD / "resnet50.onnx", "random:0")
    return write_repository(spec.CPU, BUILD / "model_repository_cpu_fuzz", onnx_path=onnx), "tritonserver_fuzz.log", 120.0


REFUSAL = re.compile(r"image refused \((header|decode)\): ")
# What a stub's RSS is made of (/proc/<pid>/status): its own heap and mappings (RssAnon), mapped files (the
# libraries' code, RssFile) and shared memory (the python backend's regions, RssShmem).
RSS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def warm_up_images() -> list[bytes]:
    """One small valid image of each format the fuzzer accepts: sent before the memory baseline is read, so
    that the decoders' one-time set-up (libraries loaded, first allocations) does not count as retention."""
    from PIL import Image

    image = Image.new("RGB", (64, 48), (90, 140, 200))
    out = []
    for fmt in ("JPEG", "PNG", "WEBP", "BMP", "TIFF"):
        buf = io.BytesIO()
        image.save(buf, fmt)
        out.append(buf.getvalue())
    return out


def stub_memory(pids) -> dict[str, float]:
    """The largest of each :data:`RSS_FIELDS` over the stubs ``pids``, in MiB (0 for a stub that is gone)."""
    out = dict.fromkeys(RSS_FIELDS, 0.0)
    for pid in pids:
        try:
            fields = proc_status(pid, *RSS_FIELDS)
        except OSError:
            continue
        for key in RSS_FIELDS:
            out[key] = max(out[key], fields.get(key, 0) / MiB)
    return out


def trend(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index (MiB a round); 0 for fewer than two."""
    if len(values) < 2:
        return 0.0
    x = np.arange(len(values), dtype=float)
    return float(np.polyfit(x, np.asarray(values, dtype=float), 1)[0])


def rounds_verdict(after: list[float], max_slope: float) -> dict:
    """Retention or growth from the step's RSS after each round (MiB): rounds after the first are compared,
    since the first round may still set things up (buffers sized by the largest image). ``growth``: the
    least-squares slope of rounds 2..N exceeds ``max_slope`` MiB a round."""
    later = after[1:]
    slope = trend(later)
    return {"slope_mib_per_round": slope, "first_mib": after[0] if after else 0.0,
            "last_mib": after[-1] if after else 0.0, "spread_after_first_mib": (max(later) - min(later)) if later else 0.0,
            "verdict": "growth" if len(later) >= 2 and slope > max_slope else "plateau" if len(later) >= 2 else "too few rounds"}


def serve_pass(sample: list[dict], args, repeat: list[dict] = ()) -> dict:
    """Send ``sample`` to the real server, each case among three valid photos, and check the answers; then
    send ``repeat`` ``args.rounds`` times more, reading the preprocess stubs' memory after each round."""
    import tritonvision as tv
    from tritonvision import sample_images, spec
    from tritonvision_server.launcher import MALLOC_ENV, TritonServer

    repo, log_name, startup = serve_repository(args.profile)
    photos = [p.read_bytes() for p in sample_images()][:3]
    malloc_env = {} if args.glibc_malloc else dict(MALLOC_ENV)
    report = {"profile": args.profile, "cases": 0, "as_expected": 0, "refused": 0, "classified": 0, "faults": [],
              "photos_changed": 0, "malloc_env": malloc_env}
    with TritonServer(repo, log_file=BUILD / log_name, startup_timeout=startup, malloc_env=malloc_env) as server:
        # Every python-backend stub in the server's process group (one per model instance): the preprocess
        # ones read the hostile bytes; the others must not grow either.
        stubs = server.stub_processes()
        pre = {pid for pid, cmd in stubs.items() if f"{spec.PREPROCESS}/1/model.py" in cmd}
        if not pre:
            raise RuntimeError(f"no {spec.PREPROCESS} stub among {stubs}")
        idle = {pid: proc_status(pid, "VmRSS")["VmRSS"] for pid in stubs}
        report["stub_idle"] = stub_memory(pre)
        peak, stop = dict(idle), threading.Event()
        window = dict(idle)  # the peak since the current round began

        def watch():
            while not stop.is_set():
                for pid, value in peak.items():
                    try:
                        rss = proc_status(pid, "VmRSS")["VmRSS"]
                    except OSError:
                        continue
                    peak[pid] = max(value, rss)
                    window[pid] = max(window[pid], rss)
                time.sleep(0.05)

        def send(clf, case, reference, tally) -> bool:
            """One case among the photos, checked and counted in ``tally``; False once the server is gone."""
            expected = case["result"]["outcome"]
            results = clf.classify_batch([photos[0], case["data"], photos[1], photos[2]], return_exceptions=True)
            tally["cases"] += 1
            got = results[1]
            problems = []
            for ref, res in zip(reference, (results[0], results[2], results[3])):
                if not isinstance(res, list) or [p.label for p in res] != [p.label for p in ref] or \
                        not np.allclose([p.score for p in res], [p.score for p in ref], atol=1e-4):
                    tally["photos_changed"] += 1
                    problems.append(f"a valid photo in its batch got {res!r}"[:300])
            if expected == "decoded" and not isinstance(got, list):
                problems.append(f"decoded in process, refused by the server: {got!r}"[:300])
            if expected in ("refused-header", "refused-decode") and not (
                    isinstance(got, tv.InvalidImageError) and REFUSAL.search(str(got))):
                problems.append(f"refused in process ({expected}), server answered {got!r}"[:300])
            tally["refused" if isinstance(got, tv.InvalidImageError) else "classified"] += 1
            if not server.running:
                problems.append("the server died")
            if problems:
                report["faults"].append({"index": case["index"], "format": case["format"], "in_process": expected,
                                         "problems": problems})
            else:
                tally["as_expected"] += 1
            return server.running

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.monotonic()
        rounds = []
        # The repeated cases' answers, checked as the sample's and counted apart from them.
        report["rounds_tally"] = tally = {k: 0 for k in ("cases", "as_expected", "refused", "classified", "photos_changed")}
        try:
            with tv.Classifier(server.grpc_url, timeout=180) as clf:
                reference = [clf.classify(p) for p in photos]
                for image in warm_up_images():
                    clf.classify(image)
                report["stub_warm"] = stub_memory(pre)  # after the photos and one image of every format
                alive = True
                for case in sample:
                    if not (alive := send(clf, case, reference, report)):
                        break
                report["sample_seconds"] = time.monotonic() - started
                report["stub_after_sample"] = stub_memory(pre)
                for r in range(args.rounds if alive else 0):
                    round_started = time.monotonic()
                    window.update(dict.fromkeys(window, 0))
                    for case in repeat:
                        if not (alive := send(clf, case, reference, tally)):
                            break
                    if not alive:
                        break
                    held = stub_memory(pre)  # read once the round's last answer is in: the server is idle
                    rounds.append({"round": r + 1, "cases": len(repeat), "seconds": time.monotonic() - round_started,
                                   "peak_mib": max(window[pid] for pid in pre) / MiB,
                                   **{f"{k}_mib": v for k, v in held.items()}})
                    log.info("round %d: preprocess stub peak %.0f MiB, after: %s", r + 1, rounds[-1]["peak_mib"],
                             ", ".join(f"{k} {v:.0f} MiB" for k, v in held.items()))
                report["alive_after"] = server.running and clf.is_ready()
        finally:
            stop.set()
            watcher.join()
        report["seconds"] = time.monotonic() - started
        report["stubs"] = len(stubs)
        report["stub_idle_mib"] = max(idle[pid] for pid in pre) / MiB
        report["stub_peak_mib"] = max(peak[pid] for pid in pre) / MiB
        after = {}
        for pid in stubs:
            try:
                after[pid] = proc_status(pid, "VmRSS")["VmRSS"]
            except OSError:
                after[pid] = 0
        report["stub_after_mib"] = max(after[pid] for pid in pre) / MiB  # what it kept once the pass was over
        report["stubs_idle_total_mib"] = sum(idle.values()) / MiB
        report["stubs_peak_total_mib"] = sum(peak.values()) / MiB
        grown = {pid: (peak[pid] - idle[pid]) / MiB for pid in stubs if pid not in pre}
        report["other_stubs_max_growth_mib"] = max(grown.values(), default=0.0)
        if args.rounds:
            # The repeated cases' bytes are kept, so that what held memory can be sent again by hand.
            args.save_dir.mkdir(parents=True, exist_ok=True)
            report["repeated"] = []
            for c in repeat:
                path = args.save_dir / f"costly-{c['index']:05d}-{c['seed']}.bin"
                path.write_bytes(c["data"])
                report["repeated"].append({"index": c["index"], "format": c["format"], "bytes": len(c["data"]),
                                           "size": [c["result"].get("width"), c["result"].get("height")],
                                           "in_process": c["result"]["outcome"],
                                           "case_rss_mib": c["result"].get("case_rss_mib"),
                                           "step_seconds": c["result"].get("step_seconds"), "file": str(path)})
            report["rounds"] = rounds
            report["rounds_summary"] = rounds_verdict([r["VmRSS_mib"] for r in rounds], args.max_growth)
            if report["rounds_summary"]["verdict"] == "growth":
                slope = report["rounds_summary"]["slope_mib_per_round"]
                problem = (f"the preprocess stub's RSS grew {slope:.1f} MiB a round over rounds 2-{len(rounds)} "
                           f"(allowed {args.max_growth:g})")
                report["faults"].append({"problems": [problem]})
        over = [pid for pid in stubs if peak[pid] > args.rss_cap * MiB]
        if over:
            report["faults"].append({"problems": [f"stub {pid} ({stubs[pid][-60:]}) RSS {peak[pid] / MiB:.0f} MiB "
                                                  f"over the {args.rss_cap} MiB cap" for pid in over]})
    return report


# --- report --------------------------------------------------------------------------------------------


def summarise(cases: list[dict]) -> list[dict]:
    rows = []
    by_format = defaultdict(list)
    for c in cases:
        by_format[c["format"]].append(c)
    for fmt in sorted(by_format):
        group = by_format[fmt]
        outcomes = Counter(c["result"]["outcome"] for c in group)
        # The preprocess step's time (what the server pays), or the header check's for refused cases.
        slowest = max(group, key=lambda c: c["result"].get("step_seconds", c["result"]["seconds"]))
        heaviest = max(group, key=lambda c: c["result"].get("case_rss_mib", 0.0))
        rows.append({"format": fmt, "cases": len(group), "refused_header": outcomes["refused-header"],
                     "refused_decode": outcomes["refused-decode"], "decoded": outcomes["decoded"],
                     "faults": outcomes["fault"], "mismatches": sum(bool(c["result"].get("mismatch")) for c in group),
                     "max_case_rss_mib": max(c["result"].get("case_rss_mib", 0.0) for c in group),
                     "max_rss_mib": max(c["result"].get("peak_rss_mib", 0.0) for c in group),
                     "heaviest_case": heaviest["index"],
                     "heaviest_size": [heaviest["result"].get("width"), heaviest["result"].get("height")],
                     "slowest_s": slowest["result"].get("step_seconds", slowest["result"]["seconds"]),
                     "slowest_case": slowest["index"],
                     "slowest_size": [slowest["result"].get("width"), slowest["result"].get("height")]})
    return rows


def rounds_table(server: dict) -> str:
    """The preprocess stub's memory after each round of ``--rounds`` (MiB)."""
    idle, warm, sample = server["stub_idle"], server["stub_warm"], server["stub_after_sample"]
    def row(name, fields, peak=None, seconds=None):
        return (f"{name:>14} {'' if peak is None else f'{peak:.0f}':>6} "
                + " ".join(f"{fields[k]:>{len(k) + 1}.0f}" for k in RSS_FIELDS)
                + f" {'' if seconds is None else f'{seconds:.1f}':>8}")

    title = (f"\n{len(server['repeated'])} costliest cases ({', '.join(c['format'] for c in server['repeated'])}) "
             f"sent {len(server['rounds'])} more times; preprocess stub memory, MiB (malloc env: "
             f"{server['malloc_env'] or 'glibc defaults'}):")
    lines = [title,
             f"{'':>14} {'peak':>6} " + " ".join(f"{k:>{len(k) + 1}}" for k in RSS_FIELDS) + f" {'seconds':>8}",
             row("idle", idle), row("warm", warm), row("after sample", sample, seconds=server["sample_seconds"])]
    for r in server["rounds"]:
        lines.append(row(f"round {r['round']}", {k: r[f"{k}_mib"] for k in RSS_FIELDS}, r["peak_mib"], r["seconds"]))
    s = server["rounds_summary"]
    lines.append(f"rounds 2-{len(server['rounds'])}: {s['slope_mib_per_round']:+.1f} MiB a round (least squares), "
                 f"spread {s['spread_after_first_mib']:.0f} MiB: {s['verdict']}")
    return "\n".join(lines)


def _size(wh) -> str:
    return "refused" if wh[0] is None else f"{wh[0]}x{wh[1]}"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=2500, help="cases in process (the seeds count among them)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", choices=sorted(STEPS), default="cpu",
                    help="whose preprocess step decodes in process and which profile the server pass serves "
                         "(gpu-torch's runs on the CPU device)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds the preprocess step may take over a case (default: 10; 30 for gpu-torch, which "
                         "takes 10-12 s on 2 CPU cores for a 1 KB JPEG claiming 120 MP)")
    ap.add_argument("--hang", type=float, default=60.0, help="seconds after which a case's worker is killed")
    ap.add_argument("--rss-cap", type=int, default=None,
                    help="MiB of RSS the worker (or server stub) may reach (default: 3072; 5120 for gpu-torch)")
    ap.add_argument("--bytes-per-pixel", type=float, default=None,
                    help="RSS a case may add, per pixel of its header's size (default: 16; 32 for gpu-torch, whose "
                         "resize works on a float copy of the whole image)")
    ap.add_argument("--rss-slack", type=int, default=192, help="MiB any case may add")
    ap.add_argument("--server", type=int, default=60, help="cases to send to the real server of --profile (0: none)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="after the server pass, send each format's costliest accepted cases (and a crafted PNG "
                         "that fails late in its decode) this many times more, reading the preprocess stubs' RSS "
                         "after each round: a plateau is memory kept for reuse, growth from round to round a leak")
    ap.add_argument("--max-growth", type=float, default=8.0,
                    help="MiB a round the preprocess stub's RSS may grow over rounds 2..N (least-squares slope) "
                         "before --rounds reports a fault")
    ap.add_argument("--glibc-malloc", action="store_true",
                    help="serve with glibc's default malloc settings instead of the launcher's MALLOC_ENV")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "fuzz_images.json")
    ap.add_argument("--save-dir", type=Path, default=None,
                    help="where the bytes of faulty (and mismatched) cases are written (default: --out without .json)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    ap.add_argument("--verbose", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")

    torch_profile = args.profile == "gpu-torch"
    args.rss_cap = args.rss_cap or (5120 if torch_profile else 3072)
    args.timeout = args.timeout or (30.0 if torch_profile else 10.0)
    args.bytes_per_pixel = args.bytes_per_pixel or (32.0 if torch_profile else 16.0)
    if args.save_dir is None:
        args.save_dir = args.out.with_suffix("")
    cases = make_cases(args.cases, args.seed)
    for i, c in enumerate(cases):
        c["index"] = i
    started = time.monotonic()
    fuzz(cases, args)
    seconds = time.monotonic() - started
    rows = summarise(cases)

    saved = []
    for c in cases:
        r = c["result"]
        if r["outcome"] == "fault" or r.get("mismatch"):
            args.save_dir.mkdir(parents=True, exist_ok=True)
            path = args.save_dir / f"{'fault' if r['outcome'] == 'fault' else 'mismatch'}-{c['index']:05d}-{c['seed']}.bin"
            path.write_bytes(c["data"])
            saved.append({"index": c["index"], "seed": c["seed"], "format": c["format"], "mutations": c["mutations"],
                          "bytes": len(c["data"]), "file": str(path), **{k: v for k, v in r.items()}})

    repeat = []
    if args.server and args.rounds:
        crafted = crafted_cases(len(cases))
        fuzz(crafted, args)
        repeat = costliest(cases) + crafted
    server = (serve_pass(server_sample(cases, args.server, random.Random(args.seed)), args, repeat)
              if args.server else None)

    hw = hardware()
    print(f"\n{hw['cpu']}, {hw['cores']} cores; {args.profile} profile's step; {len(cases)} cases (seed {args.seed}) "
          f"in {seconds:.0f} s, "
          f"{args.worker_starts} worker start(s)\n")
    print(f"{'format':>6} {'cases':>6} {'refused':>8} {'decode-':>8} {'decoded':>8} {'faults':>6} {'mismatch':>8}"
          f" {'case RSS':>9} {'max RSS':>8} {'slowest':>8}")
    print(f"{'':>6} {'':>6} {'(header)':>8} {'refused':>8} {'':>8} {'':>6} {'':>8} {'MiB':>9} {'MiB':>8} {'step s':>8}")
    for r in rows:
        print(f"{r['format']:>6} {r['cases']:>6} {r['refused_header']:>8} {r['refused_decode']:>8} {r['decoded']:>8}"
              f" {r['faults']:>6} {r['mismatches']:>8} {r['max_case_rss_mib']:>9.0f} {r['max_rss_mib']:>8.0f}"
              f" {r['slowest_s']:>8.2f}  (heaviest #{r['heaviest_case']} {_size(r['heaviest_size'])},"
              f" slowest #{r['slowest_case']} {_size(r['slowest_size'])})")
    for s in saved:
        print(f"  {'FAULT' if s['outcome'] == 'fault' else 'mismatch'} #{s['index']} {s['seed']} {'+'.join(s['mutations'])}:"
              f" {s.get('fault') or s.get('decoded')} -> {s['file']}")
    if server:
        print(f"\n{server['profile']} server: {server['cases']} hostile cases each among 3 valid photos, {server['as_expected']} as expected,"
              f" {len(server['faults'])} faults, {server['photos_changed']} photos classified differently; alive after:"
              f" {server['alive_after']}; {server['refused']} refused, {server['classified']} classified; preprocess stub RSS"
              f" {server['stub_idle_mib']:.0f} MiB idle, {server['stub_peak_mib']:.0f} MiB peak,"
              f" {server['stub_after_mib']:.0f} MiB after; all {server['stubs']}"
              f" stubs {server['stubs_idle_total_mib']:.0f} -> {server['stubs_peak_total_mib']:.0f} MiB;"
              f" {server['seconds']:.0f} s")
        if server.get("rounds") is not None:
            print(rounds_table(server))
        for f in server["faults"]:
            print(f"  SERVER FAULT {f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "hardware": hw, "date": time.strftime("%Y-%m-%d", time.gmtime()), "profile": args.profile,
        "cases": len(cases), "seed": args.seed, "seconds": seconds, "rounds": args.rounds,
        "worker_starts": args.worker_starts,
        "limits": {"timeout_s": args.timeout, "rss_cap_mib": args.rss_cap, "bytes_per_pixel": args.bytes_per_pixel,
                   "rss_slack_mib": args.rss_slack},
        "seeds": sorted({c["seed"] for c in cases}), "mutations": sorted(MUTATIONS),
        "rows": rows, "faults_and_mismatches": saved, "server": server}, indent=2, default=str))
    log.info("wrote %s", args.out)
    faults = sum(r["faults"] for r in rows) + (len(server["faults"]) if server else 0)
    return 1 if faults else 0


if __name__ == "__main__":
    sys.exit(main())

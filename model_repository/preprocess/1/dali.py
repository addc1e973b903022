# Generated for the gpu profile by `build_engines.py configs` from tritonvision/spec.py and
# tritonvision_server/dali_graph.py (copied below verbatim). Do not edit: change those and regenerate.
# The Triton DALI backend autoserialises this file with the server image's own DALI when it loads the
# model, so the pipeline always matches the DALI that runs it. Needs only nvidia.dali.
"""The preprocessing graph in DALI operators: decode, resize the shorter side, centre-crop, normalise, CHW.

This module imports nothing but ``nvidia.dali``, because the gpu profile ships its source verbatim inside
``preprocess/1/dali.py``: the Triton DALI backend builds (autoserialises) that file with the DALI of the
server image, not the DALI that wrote it, so the model runs on whatever DALI the image has. The cpu profile
imports the same function (:mod:`.pipeline`). Every number comes in as an argument, from ``tritonvision.spec``.

Checked against DALI 1.53.0, 2.1.1 and 2.4.0 (``tests/test_dali_versions.py`` runs it under each).
"""

import nvidia.dali.fn as fn
import nvidia.dali.math as dmath
import nvidia.dali.types as types
from nvidia.dali import backend as _backend


def orientation_aware_ops():
    """``(decoder, peek_image_shape)`` that apply EXIF orientation, on this DALI.

    Up to DALI 2.1 at least, ``fn.decoders.image`` and ``fn.peek_image_shape`` ignore EXIF orientation and
    only the ``fn.experimental`` twins (nvImageCodec) apply it; in newer DALI the plain operators have the
    ``adjust_orientation`` argument and the experimental names are deprecated aliases. Decided by the
    operator schema, not the version number, so a phone photo is upright under every DALI.
    """
    if "adjust_orientation" in _backend.GetSchema("decoders__Image").GetArgumentNames():
        return fn.decoders.image, fn.peek_image_shape
    return fn.experimental.decoders.image, fn.experimental.peek_image_shape


def _centre_offset(size, crop):
    """``round((size - crop) / 2)`` with Python's half-to-even rounding, in DALI integer arithmetic."""
    margin = fn.cast(size, dtype=types.INT32) - crop
    half = margin // 2
    return half + (margin - 2 * half) * (half - 2 * (half // 2))


def preprocess_graph(input_name, pixel_count_name, decoder_device, pixels_dtype, hw_decoder_load, resize_shorter,
                     crop, mean_255, std_255):
    """Build the graph inside a ``pipeline_def``; returns the ``[3, crop, crop]`` pixels node.

    ``pixel_count_name``: an input carrying the header check's INT64 pixel count of each image (gpu profile),
    or None. The graph does not need it: it orders the ensemble (Triton starts this step once the check has
    passed) and Triton's batcher reads it for the pixel budget. DALI prunes an input that no output depends
    on and then refuses to be fed it, so it is consumed as a mirror flag that is always 0.
    """
    decode, peek = orientation_aware_ops()
    encoded = fn.external_source(name=input_name, dtype=types.UINT8, ndim=1, device="cpu")
    never_mirror = 0
    if pixel_count_name is not None:
        pixel_count = fn.external_source(name=pixel_count_name, dtype=types.INT64, ndim=1, device="cpu")
        never_mirror = fn.cast(pixel_count * 0, dtype=types.INT32)
    if decoder_device == "mixed":
        # hw_decoder_load: the share of each batch sent to the A100/H100/H200 hardware JPEG decoder; the
        # rest goes to the CUDA decoder so both run at once. jpeg_fancy_upsampling: both GPU decoders
        # upsample chroma the way the CPU decoder (libjpeg-turbo, like PIL) does; DALI's default for them is
        # off, which gives chroma-subsampled JPEGs (most photos) other colours than the CPU decoder.
        images = decode(encoded, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load,
                        jpeg_fancy_upsampling=True, adjust_orientation=True)
    else:
        images = decode(encoded, device="cpu", output_type=types.RGB, adjust_orientation=True)
    # torchvision's Resize truncates the long side (int(256 * long / short)) and CenterCrop rounds its
    # offset half-to-even; DALI's resize_shorter and crop_pos round differently, up to a pixel, so both are
    # computed here from the header's (EXIF-oriented) shape to match torchvision exactly.
    shape = peek(encoded, dtype=types.FLOAT, adjust_orientation=True)
    height, width = shape[0], shape[1]
    short = dmath.min(height, width)
    new_h = dmath.floor(height * float(resize_shorter) / short)
    new_w = dmath.floor(width * float(resize_shorter) / short)
    images = fn.resize(images, resize_y=new_h, resize_x=new_w, interp_type=types.INTERP_LINEAR)
    anchor = fn.stack(_centre_offset(new_h, crop), _centre_offset(new_w, crop))
    images = fn.slice(images, anchor, fn.constant(idata=[crop, crop], dtype=types.INT32), axes=[0, 1])
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT16 if pixels_dtype == "FP16" else types.FLOAT,
        output_layout="CHW",
        mirror=never_mirror,
        mean=list(mean_255),
        std=list(std_255),
    )


# --- the model ---------------------------------------------------------------------------------------

import nvidia.dali as dali  # noqa: E402
from nvidia.dali.plugin.triton import autoserialize  # noqa: E402


# batch_size, num_threads and the device are the DALI backend's to set from config.pbtxt when it loads the
# model; device_id=None lets the GPU pipeline serialise on a machine without CUDA (a Docker build, CI).
@autoserialize
@dali.pipeline_def(batch_size=128, num_threads=4, device_id=None)
def preprocess():
    return preprocess_graph('IMAGE', 'PIXEL_COUNT', 'mixed', 'FP16', 0.65, 256, 224, (123.675, 116.28, 103.53), (58.395, 57.120000000000005, 57.375))

"""Run inside a virtual environment that has only one DALI release (and numpy): see test_dali_versions.py.

It loads a generated ``preprocess/1/dali.py`` exactly as the Triton DALI backend does, then:

1. autoserialises its GPU pipeline (``invoke_autoserialize``, the backend's own call) without a GPU, and
   reports the boolean operator arguments the serialised pipeline sets (what the GPU decoder will be told);
2. runs the very same graph function from that file with the CPU decoder over the images in a folder
   and saves the pixels, so the caller can compare them with torchvision and across DALI releases.

Usage: python dali_version_probe.py DALI_PY IMAGES_DIR OUT_DIR   (writes OUT_DIR/result.json and *.npy)
"""

import ast
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np


# Boolean arguments as DALI's serialised pipeline stores them: the name, the type "bool", then the value.
BOOL_ARGUMENTS = ("jpeg_fancy_upsampling", "adjust_orientation")


def serialized_bools(data: bytes) -> dict[str, list[bool]]:
    """``{argument: [value for each operator that sets it]}`` in a serialised DALI pipeline."""
    return {name: [v == b"\x01" for v in re.findall(re.escape(name.encode()) + rb"\x12\x04bool0([\x00\x01])", data)]
            for name in BOOL_ARGUMENTS}


def main(dali_py: str, images_dir: str, out_dir: str) -> int:
    import nvidia.dali as dali
    from nvidia.dali._utils.autoserialize import invoke_autoserialize

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = importlib.util.spec_from_file_location("autoserialize_mod", dali_py)
    module = importlib.util.module_from_spec(spec)
    sys.modules["autoserialize_mod"] = module
    spec.loader.exec_module(module)
    serialized = out / "model.dali"
    invoke_autoserialize(module, str(serialized))

    # The file's own call, with the CPU decoder swapped in: same graph, same numbers.
    source = Path(dali_py).read_text()
    call = source[source.rindex("return preprocess_graph") + len("return preprocess_graph"):].strip()
    args = list(ast.literal_eval(call))  # a literal tuple written by the generator
    pixel_count = args[1]
    args[2], args[3] = "cpu", "FP32"
    names = sorted(p.name for p in Path(images_dir).iterdir())

    @dali.pipeline_def(batch_size=len(names), num_threads=1, device_id=None, prefetch_queue_depth=1,
                       exec_async=False, exec_pipelined=False)
    def cpu_pipeline():
        return module.preprocess_graph(*args)

    pipe = cpu_pipeline()
    pipe.build()
    pipe.feed_input(args[0], [np.fromfile(Path(images_dir) / n, dtype=np.uint8) for n in names])
    if pixel_count is not None:  # the header check's pixel counts, as the validate step sends them
        pipe.feed_input(pixel_count, [np.full(1, 120_000_000, dtype=np.int64) for _ in names])
    (pixels,) = pipe.run()
    array = pixels.as_array()
    for i, name in enumerate(names):
        np.save(out / f"{name}.npy", array[i])
    decoder, peek = module.orientation_aware_ops()
    (out / "result.json").write_text(json.dumps({
        "dali_version": dali.__version__,
        "serialized_bytes": serialized.stat().st_size,
        "serialized_bools": serialized_bools(serialized.read_bytes()),
        "decoder": decoder.__module__ + "." + decoder.__name__,
        "images": names,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

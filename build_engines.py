#!/usr/bin/env python3
"""Build the model artifacts: ONNX export, TensorRT engines, DALI pipeline, configs. See ``--help``.

An installed ``tritonvision[server]`` has the same command under the same name; the code lives in
``server/tritonvision_server/build_engines.py``.
"""

import sys

from tritonvision_server.build_engines import main

if __name__ == "__main__":
    sys.exit(main())

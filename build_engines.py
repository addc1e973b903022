#!/usr/bin/env python3
"""Build the model artifacts: ONNX export, TensorRT engines, DALI pipeline, configs. See ``--help``.

Same as the ``tritonvision-build`` entry point; the code lives in ``server/tritonvision_server/build.py``.
"""

import sys

from tritonvision_server.build import main

if __name__ == "__main__":
    sys.exit(main())

"""ONNX Runtime as the cpu profile runs it, shared by its ``resnet50`` step and the benchmarks."""

from __future__ import annotations

from pathlib import Path


def session_options(intra_op_threads: int, spinning: bool):
    """Options for a session on cores it shares with other processes (the server, the preprocess step)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    # Even a spinning session must stop when its run ends: threads left spinning would take the cores
    # the server and the preprocess step need next.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


class OnnxRunner:
    """The ONNX file in two sessions: batches up to ``spin_max_batch`` in one whose threads spin between
    parallel sections (latency at low load), larger ones in one whose threads sleep (throughput under load,
    when another process decodes on the same cores). ``spin_max_batch=0`` keeps only the second."""

    def __init__(self, path: str | Path, *, intra_op_threads: int, spin_max_batch: int):
        import onnxruntime as ort

        def session(spinning: bool):
            return ort.InferenceSession(str(path), session_options(intra_op_threads, spinning),
                                        providers=["CPUExecutionProvider"])

        self.spin_max_batch = spin_max_batch
        self.sleeping = session(False)
        self.spinning = session(True) if spin_max_batch > 0 else None
        self.input_name = self.sleeping.get_inputs()[0].name
        self.output_name = self.sleeping.get_outputs()[0].name

    def session_for(self, batch_size: int):
        if self.spinning is not None and batch_size <= self.spin_max_batch:
            return self.spinning
        return self.sleeping

    def __call__(self, batch):
        """Scores ``[n, classes]`` of a ``[n, 3, h, w]`` float32 batch."""
        return self.session_for(len(batch)).run([self.output_name], {self.input_name: batch})[0]

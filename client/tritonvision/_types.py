"""Result types."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from .exceptions import TritonVisionError


@dataclass(frozen=True)
class TLS:
    """gRPC over TLS: ``root_cert`` (PEM file) verifies the server (None: the system's roots); ``cert`` and
    ``key`` are this client's certificate and key for a server that requires mutual TLS."""

    root_cert: str | os.PathLike | None = None
    cert: str | os.PathLike | None = None
    key: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")

    @staticmethod
    def _read(path) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as fh:
            return fh.read()

    def credentials(self):
        """``grpc.ChannelCredentials`` for these files."""
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self._read(self.root_cert),
                                            private_key=self._read(self.key), certificate_chain=self._read(self.cert))

    def tritonclient_args(self) -> dict:
        """The same, as tritonclient's ``InferenceServerClient`` takes them (it reads the files itself)."""
        paths = {"root_certificates": self.root_cert, "private_key": self.key, "certificate_chain": self.cert}
        return {"ssl": True, **{k: str(v) for k, v in paths.items() if v is not None}}


@dataclass(frozen=True)
class Prediction:
    """One class of the top-k: its ImageNet label, class index and softmax score."""

    label: str
    index: int
    score: float

    @classmethod
    def parse(cls, entry: bytes | str) -> "Prediction":
        """Parse Triton's classification entry ``score:index:label`` (labels may contain ':')."""
        text = entry.decode() if isinstance(entry, bytes) else entry
        score, index, label = text.split(":", 2)
        return cls(label=label, index=int(index), score=float(score))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Classification:
    """The outcome of one image of a stream: its position in the input, and predictions or an error.

    A failed image does not end the stream; :meth:`unwrap` raises its error where a caller wants that.
    """

    index: int
    predictions: list[Prediction] | None = None
    error: TritonVisionError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> list[Prediction]:
        if self.error is not None:
            raise self.error
        assert self.predictions is not None
        return self.predictions

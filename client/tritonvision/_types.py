"""Result types."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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

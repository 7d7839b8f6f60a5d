"""The value every scoring call returns (same fields as llm-siren's ScoreResult)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ScoreResult:
    score: float
    is_harmful: bool
    threshold: float

    def to_dict(self) -> dict:
        return asdict(self)

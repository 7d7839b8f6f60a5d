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


#: The verdict's name on each surface. Each keeps the name its users' tools expect
#: (llm-siren's ScoreResult in Python and the CLI; OpenAI's moderation object over HTTP and
#: in corpus output), so one guard speaks both: this table is the mapping the docs print.
VERDICT_FIELDS = (
    ("Python API (`ScoreResult`)", "is_harmful", "llm-siren's ScoreResult"),
    ("`siren score --json`", "is_harmful", "the Python result, one object per line"),
    ("`siren score` (plain)", "HARMFUL / ok", "second column"),
    ("HTTP `/v1/moderations`, streams", "flagged", "OpenAI's moderation object"),
    ("HTTP `/classify`", "label: harmful / safe", "vLLM's classification object"),
    ("HTTP detector API", "a detection (or none)", "FMS guardrails detector API"),
    ("`siren score-corpus`, `SirenScorer`", "flagged", "a column, as OpenAI names it"),
    ("Triton", "none: `SCORE` only", "the client compares it with its threshold"),
)

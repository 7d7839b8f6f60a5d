"""The calibration texts shipped with the runtime: varied lengths and content, used by the
export self-check and the `siren verify` parity gate (one place reads the file)."""
from __future__ import annotations

from importlib import resources


def calibration_texts() -> list[str]:
    """One text per line of data/calibration.txt, with `\\n` escapes turned into newlines."""
    raw = (resources.files("siren_runtime") / "data" / "calibration.txt").read_text(encoding="utf-8")
    return [line.replace("\\n", "\n") for line in raw.splitlines() if line.strip()]

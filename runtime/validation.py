"""Argument checks done before any work, so a rejected call changes nothing."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence


def check_threshold(threshold: Optional[float], default: float) -> float:
    if threshold is None:
        return default
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise ValueError(f"threshold must be a real number in [0, 1], got {threshold!r}")
    try:
        value = float(threshold)
    except OverflowError:       # an int beyond float's range, e.g. 10**400
        raise ValueError(f"threshold must be in [0, 1], got an integer of {len(str(threshold))} digits") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
    return value


def check_text(value, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def check_texts(texts) -> list:
    if isinstance(texts, (str, bytes)):
        raise TypeError("score_batch expects a list of strings, got a single "
                        f"{type(texts).__name__}; use score() for one text")
    if not isinstance(texts, Sequence) and not hasattr(texts, "__iter__"):
        raise TypeError(f"score_batch expects a list of strings, got {type(texts).__name__}")
    items = list(texts)
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    return items

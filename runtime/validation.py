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
        value = math.inf
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {_shown(threshold)}")
    return value


def _shown(value) -> str:
    """A number as an error message can show it (a huge int by its size: str() of one past
    4300 digits raises)."""
    if isinstance(value, int) and abs(value) >= 10 ** 30:
        return f"an integer of about {int(abs(value).bit_length() * 0.30103) + 1} digits"
    return repr(value)


def check_text(value, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    check_encodable(value, name)
    return value


def check_encodable(value: str, name: str) -> None:
    """A str the tokenizer can take: no lone surrogates (tokenizers raises a bare TypeError)."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode: code point {value[e.start]!r} at index {e.start} "
                         "is a lone surrogate") from None


def check_int(value, name: str, *, low: int = 1, high: Optional[int] = None, optional: bool = False):
    """The one check of every count option and argument: a real integer (not a bool) in
    [low, high] (None: no upper bound); `optional` lets None through. Returns the value."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        where = f"of at least {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {where}, got {value!r}")
    return value


def check_strings(value, where: str) -> None:
    """Every string inside a JSON-like value (an agent run's messages, its tools) is one the
    tokenizer takes; the ValueError names the place (`messages[2].content`)."""
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            check_encodable(item, path)
        elif isinstance(item, dict):
            stack.extend((v, f"{path}.{k}") for k, v in item.items())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))


def check_texts(texts) -> list:
    if isinstance(texts, (str, bytes)):
        raise TypeError("score_batch expects a list of strings, got a single "
                        f"{type(texts).__name__}; use score() for one text")
    if not isinstance(texts, Sequence) and not hasattr(texts, "__iter__"):
        raise TypeError(f"score_batch expects a list of strings, got {type(texts).__name__}")
    items = list(texts)
    for i, t in enumerate(items):
        check_text(t, f"texts[{i}]")
    return items

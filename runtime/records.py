"""Input records as `siren score --input` and `siren score-corpus` read them: ``{"id", "text"}``
or ``{"id", "prompt", "response"}`` with an optional ``"threshold"``, every problem named by
its line (or row) and field. One reader for both commands, so a corpus row means what a
`siren score` line means.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Iterator, Optional

from .text import join_prompt_response
from .validation import check_encodable, check_threshold


@dataclass
class Record:
    """One thing to score and what to echo back with its verdict."""
    echo: dict               # fields copied into the output (id/text, or prompt/response)
    text: str                # the text scored (prompt/response already joined)
    threshold: Optional[float] = None


class InputError(ValueError):
    """A bad input record, named by its line number."""


def _decode(raw: bytes, number: int) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"line {number}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})") from None
    return line[:-1] if line.endswith("\n") else line


def _optional_text(obj: dict, key: str, at: str) -> Optional[str]:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise InputError(f"{at}: \"{key}\" must be a string, got {type(value).__name__}")
    if value is not None:
        try:
            check_encodable(value, f"\"{key}\"")
        except ValueError as e:
            raise InputError(f"{at}: {e}") from None
    return value


def _echoable_id(value, at: str):
    """An id is echoed back verbatim, so it must be writable as strict JSON and UTF-8 (no
    NaN/Infinity, no lone surrogates)."""
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError, RecursionError) as e:
        reason = "a lone surrogate" if isinstance(e, UnicodeEncodeError) else (
            "nested too deeply" if isinstance(e, RecursionError) else "NaN or an infinite number")
        raise InputError(f"{at}: \"id\" cannot be echoed back as JSON ({reason})") from None
    return value


def parse_json_record(line: str, number: int) -> Record:
    """One JSON Lines record -> Record (every problem named by its line and field)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise InputError(f"line {number}: nested too deeply to read") from None
    except ValueError as e:        # an integer literal past Python's 4300-digit limit
        raise InputError(f"line {number}: a number this tool does not read ({e})") from None
    return record_from_object(obj, number)


def record_from_object(obj, number: int, where: str = "line") -> Record:
    """A decoded record (a JSON object, or a Parquet row as a dict) -> Record; `where`
    names the position in messages ("line 3", "row 3") and in the echo of a record with no id."""
    at = f"{where} {number}"
    if not isinstance(obj, dict):
        raise InputError(f"{at}: expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"id", "text", "prompt", "response", "threshold"}
    if unknown:
        raise InputError(f"{at}: unknown field(s) {', '.join(sorted(unknown))} "
                         "(expected id, text | prompt/response, threshold)")
    text, prompt, response = (_optional_text(obj, k, at) for k in ("text", "prompt", "response"))
    if text is not None and (prompt is not None or response is not None):
        raise InputError(f"{at}: give \"text\" or \"prompt\"/\"response\", not both")
    if text is None and prompt is None and response is None:
        raise InputError(f"{at}: needs \"text\", or \"prompt\" and/or \"response\"")
    threshold = None
    if obj.get("threshold") is not None:
        try:
            threshold = check_threshold(obj["threshold"], 0.5)
        except ValueError as e:
            raise InputError(f"{at}: {e}") from None
    echo = {"id": _echoable_id(obj["id"], at)} if "id" in obj else {where: number}
    if text is not None:
        return Record(echo, text, threshold)
    echo.update(prompt=prompt, response=response)
    return Record(echo, join_prompt_response(prompt, response), threshold)


def read_records(stream, jsonl: bool, errors: str = "fail") -> Iterator[Record]:
    """Records from a byte stream, lazily; blank lines are skipped. A bad line raises
    InputError naming it (errors="fail") or is skipped with a note on stderr ("skip")."""
    for number, raw in enumerate(stream, start=1):
        try:
            line = _decode(raw, number)
            if not line.strip():
                continue
            yield parse_json_record(line, number) if jsonl else Record({"text": line}, line)
        except InputError as e:
            if errors == "skip":
                print(f"siren score: skipped {e}", file=sys.stderr)
                continue
            raise InputError(f"{e}; fix the input or pass --errors skip") from None

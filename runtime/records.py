"""Input records as `siren score --input` and `siren score-corpus` read them: ``{"id", "text"}``
or ``{"id", "prompt", "response"}`` for a content guard, ``{"id", "messages", "tools"?}`` (an
agent run, OpenAI chat rows; each may also be a JSON string, as a Parquet column holds it) for
a trajectory guard, with an optional ``"threshold"``, every problem named by its line (or row)
and field. One reader for both commands, so a corpus row means what a `siren score` line means.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from .text import join_prompt_response
from .validation import check_encodable, check_strings, check_threshold


@dataclass
class Record:
    """One thing to score and what to echo back with its verdict."""
    echo: dict               # fields copied into the output (id/text, or prompt/response)
    text: str                # the text scored (prompt/response already joined); a run's last message
    threshold: Optional[float] = None
    run: Any = None          # an agent run (a Trajectory) for a trajectory guard, else None

    @property
    def kind(self) -> str:
        """The guard kind that scores this record."""
        return "content" if self.run is None else "trajectory"

    @property
    def scored(self):
        """What the guard scores: the text, or the run."""
        return self.text if self.run is None else self.run


def check_kinds(records, guard_kind: str, where: str = "line") -> None:
    """Refuse, naming the first, a record the guard cannot score (a run for a content guard,
    a text for a trajectory guard)."""
    for record in records:
        if record.kind != guard_kind:
            at = record.echo.get("id", record.echo.get(where, "?"))
            needs = ('{"messages": [...], "tools"?: [...]} rows' if guard_kind == "trajectory"
                     else '{"text"} or {"prompt", "response"} rows')
            raise InputError(f"record {at}: a {record.kind} record, but this bundle is a {guard_kind} guard "
                             f"(it reads {needs})")


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
    if "messages" in obj:
        return _run_record(obj, number, where)
    unknown = set(obj) - {"id", "text", "prompt", "response", "threshold"}
    if unknown:
        raise InputError(f"{at}: unknown field(s) {', '.join(sorted(unknown))} "
                         "(expected id, text | prompt/response | messages/tools, threshold)")
    text, prompt, response = (_optional_text(obj, k, at) for k in ("text", "prompt", "response"))
    if text is not None and (prompt is not None or response is not None):
        raise InputError(f"{at}: give \"text\" or \"prompt\"/\"response\", not both")
    if text is None and prompt is None and response is None:
        raise InputError(f"{at}: needs \"text\", or \"prompt\" and/or \"response\"")
    threshold = _threshold(obj, at)
    echo = {"id": _echoable_id(obj["id"], at)} if "id" in obj else {where: number}
    if text is not None:
        return Record(echo, text, threshold)
    echo.update(prompt=prompt, response=response)
    return Record(echo, join_prompt_response(prompt, response), threshold)


def _threshold(obj: dict, at: str) -> Optional[float]:
    if obj.get("threshold") is None:
        return None
    try:
        return check_threshold(obj["threshold"], 0.5)
    except ValueError as e:
        raise InputError(f"{at}: {e}") from None


def _json_field(value, key: str, at: str):
    """A list field, or the JSON string of one (a Parquet column of JSON text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):
            raise InputError(f"{at}: \"{key}\" is a string but not JSON") from None
    if value is not None and not isinstance(value, (list, tuple)):
        raise InputError(f"{at}: \"{key}\" must be a list (or its JSON), got {type(value).__name__}")
    return None if value is None else [dict(v) if hasattr(v, "keys") else v for v in value]


def _run_record(obj: dict, number: int, where: str) -> Record:
    """An agent run: {"id"?, "messages", "tools"?, "threshold"?}."""
    from .trajectory import from_openai
    at = f"{where} {number}"
    unknown = set(obj) - {"id", "messages", "tools", "threshold"}
    if unknown:
        raise InputError(f"{at}: unknown field(s) {', '.join(sorted(unknown))} in an agent run "
                         "(expected id, messages, tools, threshold)")
    messages, tools = _json_field(obj["messages"], "messages", at), _json_field(obj.get("tools"), "tools", at)
    if messages is None:
        raise InputError(f"{at}: \"messages\" must be a list of chat messages, got null")
    try:
        check_strings(messages, "messages")
        check_strings(tools or [], "tools")
        run = from_openai(messages, tools)
    except (TypeError, ValueError) as e:
        raise InputError(f"{at}: {e}") from None
    echo = {"id": _echoable_id(obj["id"], at)} if "id" in obj else {where: number}
    last = run.turns[-1] if run.turns else None
    shown = "" if last is None else (last.content or last.action or last.thought or "")
    return Record(echo, shown, _threshold(obj, at), run=run)


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

"""`siren score`: texts in, one verdict per text out, streamed in bounded groups.

Input is read and answered group by group (``--batch-size`` records at a time), so a
million-line file runs in constant memory and the first answers appear at once. Records are
plain lines (stdin) or JSON Lines (``--input FILE``): ``{"id", "text"}`` or
``{"id", "prompt", "response"}`` with an optional per-record ``"threshold"``.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from siren_runtime.text import join_prompt_response
from siren_runtime.validation import check_encodable, check_threshold

#: exit statuses of `siren score` (README "Commands")
EXIT_OK, EXIT_FLAGGED, EXIT_ERROR = 0, 1, 2


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


def _optional_text(obj: dict, key: str, number: int) -> Optional[str]:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise InputError(f"line {number}: \"{key}\" must be a string, got {type(value).__name__}")
    if value is not None:
        try:
            check_encodable(value, f"\"{key}\"")
        except ValueError as e:
            raise InputError(f"line {number}: {e}") from None
    return value


def _echoable_id(value, number: int):
    """An id is echoed back verbatim, so it must be writable as strict JSON and UTF-8 (no
    NaN/Infinity, no lone surrogates)."""
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (ValueError, UnicodeEncodeError, RecursionError) as e:
        reason = "a lone surrogate" if isinstance(e, UnicodeEncodeError) else (
            "nested too deeply" if isinstance(e, RecursionError) else "NaN or an infinite number")
        raise InputError(f"line {number}: \"id\" cannot be echoed back as JSON ({reason})") from None
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
    if not isinstance(obj, dict):
        raise InputError(f"line {number}: expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - {"id", "text", "prompt", "response", "threshold"}
    if unknown:
        raise InputError(f"line {number}: unknown field(s) {', '.join(sorted(unknown))} "
                         "(expected id, text | prompt/response, threshold)")
    text, prompt, response = (_optional_text(obj, k, number) for k in ("text", "prompt", "response"))
    if text is not None and (prompt is not None or response is not None):
        raise InputError(f"line {number}: give \"text\" or \"prompt\"/\"response\", not both")
    if text is None and prompt is None and response is None:
        raise InputError(f"line {number}: needs \"text\", or \"prompt\" and/or \"response\"")
    threshold = None
    if obj.get("threshold") is not None:
        try:
            threshold = check_threshold(obj["threshold"], 0.5)
        except ValueError as e:
            raise InputError(f"line {number}: {e}") from None
    echo = {"id": _echoable_id(obj["id"], number)} if "id" in obj else {"line": number}
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


def groups(records: Iterable[Record], size: int) -> Iterator[list[Record]]:
    group = []
    for record in records:
        group.append(record)
        if len(group) >= size:
            yield group
            group = []
    if group:
        yield group


_NO_ONSET = object()


def format_row(record: Record, score, as_json: bool, onset=_NO_ONSET) -> str:
    """One output line; `onset` (with --onset): the character offset where harm starts, or None."""
    if as_json:
        extra = {} if onset is _NO_ONSET else {"onset": onset}
        return json.dumps({**record.echo, **score.to_dict(), **extra}, ensure_ascii=False)
    shown = record.text.replace("\n", "\\n")
    shown = shown if len(shown) <= 70 else shown[:67] + "..."
    label = f"{record.echo['id']}\t" if "id" in record.echo else ""
    where = "" if onset is _NO_ONSET else f"onset={'-' if onset is None else onset}\t"
    return f"{score.score:.6f}\t{'HARMFUL' if score.is_harmful else 'ok'}\t{where}{label}{shown}"


def score_records(guard, records: Iterable[Record], threshold: Optional[float], batch_size: int,
                  as_json: bool, out=None, onset: bool = False, sustain: int = 1) -> tuple[int, int]:
    """Score and print group by group; returns (records scored, records flagged). onset:
    also say where harm starts (every prefix scored in the same pass)."""
    from siren_runtime.result import ScoreResult
    out = out or sys.stdout
    scored = flagged = 0
    for group in groups(records, batch_size):
        texts = [r.text for r in group]
        results = guard.score_batch(texts)           # the verdict: exactly what plain `siren score` says
        prefixes = guard.score_prefixes_batch(texts) if onset else None
        for n, (record, result) in enumerate(zip(group, results)):
            thr = record.threshold if record.threshold is not None else (
                threshold if threshold is not None else guard.default_threshold)
            verdict = ScoreResult(score=result.score, is_harmful=bool(result.score >= thr), threshold=thr)
            flagged += verdict.is_harmful
            where = prefixes[n].onset(thr, sustain) if onset else _NO_ONSET
            print(format_row(record, verdict, as_json, where), file=out)
        out.flush()
        scored += len(group)
    return scored, flagged


def _file_records(path: str, errors: str) -> Iterator[Record]:
    """Records of a JSON Lines file, closed when read to the end (or when scoring stops)."""
    with open(path, "rb") as source:
        yield from read_records(source, jsonl=True, errors=errors)


def run_score(args) -> int:
    from siren_runtime import SirenGuard

    if args.texts and (args.prompt is not None or args.response is not None):
        raise ValueError("give TEXT arguments or --prompt/--response, not both")
    if args.input is not None and (args.texts or args.prompt is not None or args.response is not None):
        raise ValueError("give --input or TEXT / --prompt/--response, not both")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.sustain < 1:
        raise ValueError(f"--sustain must be at least 1 (tokens), got {args.sustain}")
    threshold = check_threshold(args.threshold, 0.5) if args.threshold is not None else None
    if args.prompt is not None or args.response is not None:
        records = iter([Record({"prompt": args.prompt, "response": args.response},
                               join_prompt_response(args.prompt, args.response))])
    elif args.texts:
        records = iter([Record({"text": t}, t) for t in args.texts])
    elif args.input is not None and args.input != "-":
        records = _file_records(args.input, args.errors)
    else:
        records = read_records(sys.stdin.buffer, jsonl=args.input == "-", errors=args.errors)
    guard = SirenGuard.from_pretrained(args.bundle, device=args.device, backend=args.backend,
                                       verify=not args.no_verify, revision=args.revision, cache_dir=args.cache_dir,
                                       local_files_only=args.offline)
    with guard:
        if args.onset and not guard.prefix_scores_available:
            raise ValueError("--onset needs a bundle with a streaming step graph and a prefix head "
                             "(re-export it with `siren export`)")
        _, flagged = score_records(guard, records, threshold, args.batch_size, args.json, onset=args.onset,
                                   sustain=args.sustain)
    return EXIT_FLAGGED if (args.fail_on_harmful and flagged) else EXIT_OK

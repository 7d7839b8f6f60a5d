"""`siren score`: texts (or agent runs) in, one verdict per record out, streamed in bounded groups.

Input is read and answered group by group (``--batch-size`` records at a time), so a
million-line file runs in constant memory and the first answers appear at once. Records are
plain lines (stdin) or JSON Lines (``--input FILE``): ``{"id", "text"}`` or
``{"id", "prompt", "response"}`` with an optional per-record ``"threshold"``; a trajectory
bundle reads JSON Lines agent runs, ``{"id", "messages", "tools"?}``.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

from siren_runtime.records import InputError, Record, check_kinds, parse_json_record, read_records  # noqa: F401
from siren_runtime.text import join_prompt_response
from siren_runtime.validation import check_threshold

#: exit statuses of `siren score` (README "Commands")
EXIT_OK, EXIT_FLAGGED, EXIT_ERROR = 0, 1, 2


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
    """One output line; `onset` (with --onset): the character offset where harm starts, or None.
    Plain lines always have the same columns: score, verdict, [onset,] id ("-" when the
    input gave none), the text (shortened, newlines and tabs escaped)."""
    if as_json:
        extra = {} if onset is _NO_ONSET else {"onset": onset}
        return json.dumps({**record.echo, **score.to_dict(), **extra}, ensure_ascii=False)
    shown = record.text.replace("\n", "\\n").replace("\t", "\\t")
    shown = shown if len(shown) <= 70 else shown[:67] + "..."
    label = str(record.echo["id"]).replace("\t", " ") if "id" in record.echo else "-"
    where = "" if onset is _NO_ONSET else f"onset={'-' if onset is None else onset}\t"
    return f"{score.score:.6f}\t{'HARMFUL' if score.is_harmful else 'ok'}\t{where}{label}\t{shown}"


def score_records(guard, records: Iterable[Record], threshold: Optional[float], batch_size: int,
                  as_json: bool, out=None, onset: bool = False, sustain: int = 1) -> tuple[int, int]:
    """Score and print group by group; returns (records scored, records flagged). onset:
    also say where harm starts (every prefix scored in the same pass)."""
    from siren_runtime.result import ScoreResult
    out = out or sys.stdout
    scored = flagged = 0
    kind = guard.bundle.guard.kind
    for group in groups(records, batch_size):
        check_kinds(group, kind)
        texts = [r.scored for r in group]
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


#: what `siren score` says when it waits on a terminal for texts
STDIN_HINT = "siren score: reading texts from standard input, one per line; end with Ctrl-D (or pass TEXT arguments)"


def run_score(args) -> int:
    from siren_runtime.settings import GuardSettings

    from .options import settings_from
    settings = settings_from(args, GuardSettings)
    settings.check_guard()

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
        if sys.stdin is not None and sys.stdin.isatty():
            print(STDIN_HINT, file=sys.stderr, flush=True)
        records = read_records(sys.stdin.buffer, jsonl=args.input == "-", errors=args.errors)
    with settings.load() as guard:
        if guard.bundle.guard.kind == "trajectory":
            if args.texts or args.prompt is not None or args.response is not None or args.onset:
                raise ValueError("a trajectory bundle scores agent runs: give JSON Lines rows {\"messages\": [...], "
                                 "\"tools\": [...]} with --input FILE or on standard input (TEXT, --prompt/"
                                 "--response and --onset are for content guards)")
            if args.input is None:       # plain lines cannot hold a run: stdin is read as JSON Lines
                records = read_records(sys.stdin.buffer, jsonl=True, errors=args.errors)
        if args.onset and not guard.prefix_scores_available:
            raise ValueError("--onset needs a bundle with a streaming step graph and a prefix head "
                             "(re-export it with `siren export`)")
        _, flagged = score_records(guard, records, threshold, args.batch_size, args.json, onset=args.onset,
                                   sustain=args.sustain)
    return EXIT_FLAGGED if (args.fail_on_harmful and flagged) else EXIT_OK

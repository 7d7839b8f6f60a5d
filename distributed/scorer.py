"""`SirenScorer`: a callable class for Ray Data's ``map_batches``, one guard per actor.

    ds.map_batches(SirenScorer, fn_constructor_kwargs={"bundle": "/models/siren-guard"},
                   concurrency=4, num_gpus=1, batch_size=256)

The guard is loaded once, in the constructor (so once per actor); each batch is scored
with ``score_batch``, which sorts the batch by token length and cuts padding-bounded
groups under the runner's own limits. A trajectory bundle (Agent-SIREN) scores agent runs
from a ``messages`` column (and ``tools``): OpenAI chat rows, as lists or JSON strings.
Input columns are kept; ``score`` (float64),
``flagged`` (bool) and, with ``onset=True``, ``onset`` (int64: the character offset where
harm starts, -1 where it never does) are added. The verdict is exactly what
``siren score`` says for the same text; nothing here imports Ray, so the class also runs
on a plain dict of columns.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from siren_runtime.text import join_prompt_response
from siren_runtime.validation import check_threshold
from siren_runtime.validation import check_int

#: the value of the onset column where harm never starts (an int column has no null in numpy)
NO_ONSET = -1


def _plain(value):
    """A cell as Python lists and dicts (numpy arrays of an Arrow list column become lists)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class SirenScorer:
    """Score the text column (or prompt/response columns) of each batch it is called on.

    bundle: a bundle folder or Hub repo id, as for ``SirenGuard.from_pretrained``.
    text_column, or prompt_column and/or response_column: where the text is (a prompt and
        response are joined as ``siren score --prompt/--response`` joins them; a missing
        one, or a None cell, is the empty side).
    threshold: the verdict's threshold (default: the bundle's).
    messages_column / tools_column: a trajectory bundle's run columns (default "messages" and
        "tools"; a missing tools column means no tools).
    onset / sustain: also say where harm starts (the prefix scores, in the same pass).
    guard_options: passed to ``from_pretrained`` (device, backend, intra_op_threads, ...).
    """

    def __init__(self, bundle: str, *, text_column: Optional[str] = "text", prompt_column: Optional[str] = None,
                 response_column: Optional[str] = None, threshold: Optional[float] = None, onset: bool = False,
                 sustain: int = 1, messages_column: str = "messages", tools_column: str = "tools",
                 **guard_options: Any):
        from siren_runtime.loading import load_guard

        if prompt_column is not None or response_column is not None:
            text_column = None
        elif text_column is None:
            raise ValueError("name the text: text_column, or prompt_column and/or response_column")
        check_int(sustain, "sustain (tokens)")
        self.text_column, self.prompt_column, self.response_column = text_column, prompt_column, response_column
        self.messages_column, self.tools_column = messages_column, tools_column
        self.guard = load_guard(bundle, **guard_options)
        self.kind = self.guard.bundle.guard.kind
        if onset and self.kind == "trajectory":
            self.guard.close()
            raise ValueError("onset is a content guard's (where harm starts in a text); a trajectory guard "
                             "scores whole runs")
        self.threshold = (check_threshold(threshold, 0.5) if threshold is not None
                          else self.guard.default_threshold)
        if onset and not self.guard.prefix_scores_available:
            self.guard.close()
            raise ValueError("onset needs a bundle with a streaming step graph and a prefix head "
                             "(re-export it with `siren export`)")
        self.onset, self.sustain = bool(onset), sustain

    def texts_of(self, batch) -> list:
        """What the guard scores in a batch (a dict of columns or a pandas DataFrame): texts,
        or a trajectory guard's runs; named errors for a missing column or a bad cell."""
        def column(name: str):
            if name not in batch:
                raise KeyError(f"SirenScorer: the batch has no column {name!r} (columns: "
                               f"{', '.join(map(str, list(batch.keys())))})")
            return list(batch[name])

        if self.kind == "trajectory":
            return self.runs_of(batch, column)

        def text(value, name: str, row: int, optional: bool) -> str:
            if value is None and optional:
                return ""
            if not isinstance(value, str):
                raise TypeError(f"SirenScorer: column {name!r} row {row} is {type(value).__name__}, not text")
            return value

        if self.text_column is not None:
            return [text(v, self.text_column, i, False) for i, v in enumerate(column(self.text_column))]
        sides = {name: [text(v, name, i, True) for i, v in enumerate(column(name))]
                 for name in (self.prompt_column, self.response_column) if name is not None}
        size = len(next(iter(sides.values())))
        prompts = sides.get(self.prompt_column, [None] * size)
        responses = sides.get(self.response_column, [None] * size)
        return [join_prompt_response(p, r) for p, r in zip(prompts, responses)]

    def runs_of(self, batch, column) -> list:
        """A trajectory guard's runs: the messages column (and tools), each read as
        `siren score` reads a {"messages", "tools"} row."""
        from siren_runtime.records import InputError, record_from_object
        messages = column(self.messages_column)
        tools = column(self.tools_column) if self.tools_column in batch else [None] * len(messages)
        runs = []
        for row, (m, t) in enumerate(zip(messages, tools)):
            try:
                runs.append(record_from_object({"messages": _plain(m), "tools": _plain(t)}, row, "row").run)
            except InputError as e:
                raise ValueError(f"SirenScorer: {e}") from None
        return runs

    def score_texts(self, texts: list, thresholds=None) -> dict[str, np.ndarray]:
        """The added columns for `texts` (a trajectory guard's: runs; thresholds: one per
        item, else this scorer's)."""
        thresholds = [self.threshold] * len(texts) if thresholds is None else thresholds
        scores = np.array([r.score for r in self.guard.score_batch(texts)], dtype=np.float64)
        out = {"score": scores, "flagged": np.array([s >= t for s, t in zip(scores, thresholds)], dtype=bool)}
        if self.onset:
            prefixes = self.guard.score_prefixes_batch(texts) if texts else []
            found = [p.onset(t, self.sustain) for p, t in zip(prefixes, thresholds)]
            out["onset"] = np.array([NO_ONSET if at is None else at for at in found], dtype=np.int64)
        return out

    def __call__(self, batch):
        added = self.score_texts(self.texts_of(batch))
        if hasattr(batch, "assign"):             # a pandas DataFrame (batch_format="pandas")
            return batch.assign(**added)
        return {**batch, **added}

    def __del__(self):
        guard = getattr(self, "guard", None)
        if guard is not None:
            guard.close()

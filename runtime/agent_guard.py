"""AgentSirenGuard: llm-siren's trajectory guard over an exported bundle, without torch.

A trajectory (turns, profile, tool schemas) becomes the chat messages the head was fitted on
(:mod:`siren_runtime.render`), goes through the backbone's own chat template
(:mod:`siren_runtime.chat_template`, byte-identical to transformers'), is tokenized with the
tokenizer's default call (special tokens as its post-processor adds them: Llama 3's BOS,
nothing for Qwen3) and truncated head + tail (the first max_length // 2 ids and the last
max_length - max_length // 2: the schemas stay at the front, the last action at the anchor).
The bundle's graph reads the last real token's state after the kept blocks and returns
sigmoid(state . w + b).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .backends import Runners, open_runners
from .batching import length_groups
from .bundle import Bundle
from .chat_template import ChatTemplate, TemplateError
from .guard_base import GuardBase
from .guard import (DEFAULT_MAX_BATCH, DEFAULT_STREAM_CACHE, DEFAULT_STREAM_CACHE_BYTES, DEFAULT_TOKEN_BUDGET,
                    check_kind, locate_bundle)
from .render import fold_system, messages_of
from .result import ScoreResult
from .streaming import IncrementalScorer, StreamCache, advance_through_cache
from .tokenization import pad_right
from .trajectory import Trajectory, as_trajectory, check_trajectory, from_openai
from .trajectory_stream import TrajectorySession, as_tokens
from .validation import check_int, check_threshold

#: rescored trajectories remembered by score_streaming (rendered ids -> score)
STREAM_CACHE_SIZE = 256


class TrajectoryEncoder:
    """Rendering and tokenization of trajectories with the bundle's verified files."""

    def __init__(self, bundle: Bundle):
        from tokenizers import Tokenizer
        from .errors import BundleError
        spec = bundle.guard
        try:
            self._tokenizer = Tokenizer.from_str(bytes(bundle.read_verified(bundle.tokenizer_path)).decode("utf-8"))
            template = bytes(bundle.read_verified(spec.chat_template)).decode("utf-8")
        except Exception as e:        # tokenizers raises a bare Exception; bytes that are not UTF-8
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"{bundle.directory}: its tokenizer or chat template does not load "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        try:
            self._template = ChatTemplate(template, spec.special_tokens)
        except TemplateError as e:
            raise BundleError(f"{bundle.directory}: {e}") from None
        self.max_length = bundle.inference.max_length
        self.pad_token_id = bundle.inference.pad_token_id

    def render(self, trajectory: Trajectory) -> str:
        """The chat string (llm-siren's render with rich tools): the template, retried once with
        the system message folded into the first user turn; a second refusal is a ValueError."""
        check_trajectory(trajectory)
        messages = messages_of(trajectory)
        try:
            return self._template.render(messages)
        except TemplateError:
            try:
                return self._template.render(fold_system(messages))
            except TemplateError as e:
                raise ValueError(f"the backbone's chat template refused this trajectory: {e}") from None

    def ids(self, text: str) -> list:
        """Token ids of a rendered trajectory, head + tail truncated to max_length."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"the trajectory holds a lone surrogate ({text[e.start]!r}); it is not valid Unicode") \
                from None
        ids = self._tokenizer.encode(text, add_special_tokens=True).ids
        if len(ids) <= self.max_length:
            return ids
        head = self.max_length // 2
        return ids[:head] + ids[len(ids) - (self.max_length - head):]

    def pad(self, id_lists: list) -> tuple:
        return pad_right(id_lists, self.pad_token_id, self.max_length)


class AgentSirenGuard(GuardBase):
    """Scores agent trajectories from an exported Agent-SIREN bundle (llm-siren's
    ``AgentSirenGuard`` API: ``score_trajectory``, ``score_batch``, ``score_streaming``,
    ``__call__``, ``default_threshold``). Thread-safe like SirenGuard; ``close()`` frees it."""

    def __init__(self, bundle: Bundle, runners: Runners, *, max_batch_size: int = DEFAULT_MAX_BATCH,
                 token_budget: Optional[int] = None, stream_cache: Optional[StreamCache] = None):
        check_kind(bundle, "trajectory")
        self._bundle = bundle
        self._runners = runners
        self._encoder = TrajectoryEncoder(bundle)
        self._default_threshold = bundle.inference.default_threshold
        limit = runners.score.limits.max_batch
        self._max_batch = min(int(max_batch_size), limit) if limit else int(max_batch_size)
        self._token_budget = int(token_budget or runners.score.limits.max_tokens or DEFAULT_TOKEN_BUDGET)
        self._max_padding = runners.score.limits.max_padding
        self._recent: OrderedDict = OrderedDict()
        self._recent_lock = threading.Lock()
        self._closed = False
        #: turn-by-turn scoring on the step graph (None: the bundle has none, or it was turned off)
        self._incremental = None
        if runners.step is not None and bundle.streaming is not None:
            self._incremental = IncrementalScorer(runners.step, bundle.streaming.feature_dim, self._max_batch,
                                                  self._token_budget)
        self._stream_cache = stream_cache if stream_cache is not None else StreamCache()

    @classmethod
    def from_pretrained(cls, bundle_dir: Union[str, Path], device: Optional[str] = None,
                        backend: Optional[str] = None, *, verify: bool = True,
                        max_batch_size: int = DEFAULT_MAX_BATCH, token_budget: Optional[int] = None,
                        revision: Optional[str] = None, cache_dir: Optional[Union[str, Path]] = None,
                        local_files_only: bool = False, token: Optional[Union[str, bool]] = None,
                        engines: Optional[bool] = None, incremental_streaming: bool = True,
                        stream_cache_size: int = DEFAULT_STREAM_CACHE,
                        stream_cache_bytes: int = DEFAULT_STREAM_CACHE_BYTES,
                        **backend_options) -> "AgentSirenGuard":
        """Load a trajectory bundle made by ``siren export`` (a folder or a Hub repo id); the
        options are SirenGuard.from_pretrained's. incremental_streaming: sessions and
        score_streaming run only the ids after what a stream already holds (the bundle's
        step graph); False rescores every trajectory whole."""
        if not isinstance(bundle_dir, (str, Path)):
            raise TypeError(f"bundle_dir must be a path, got {type(bundle_dir).__name__}")
        check_int(max_batch_size, "max_batch_size")
        bundle = locate_bundle(bundle_dir, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                               token=token, engines=engines, backend=backend, verify=verify)
        check_kind(bundle, "trajectory")
        stream_cache = StreamCache(stream_cache_size, stream_cache_bytes)
        runners = open_runners(bundle, backend=backend, device=device,
                               streaming=bool(incremental_streaming) and bundle.streaming is not None,
                               **backend_options)
        try:
            return cls(bundle, runners, max_batch_size=max_batch_size, token_budget=token_budget,
                       stream_cache=stream_cache)
        except BaseException:
            runners.close()
            raise

    def _forget(self) -> None:
        self._recent.clear()

    # -- scoring ------------------------------------------------------------------------
    def score_trajectory(self, trajectory: Any = None, *, messages: Optional[list] = None,
                         tools: Optional[list] = None, threshold: Optional[float] = None) -> ScoreResult:
        """Score one trajectory: a ``Trajectory``, or ``messages=`` (and ``tools=``)."""
        trajectory = _one_trajectory(trajectory, messages, tools)
        thr = check_threshold(threshold, self._default_threshold)
        return self._score([trajectory], thr)[0]

    def score_batch(self, trajectories: Sequence[Any], threshold: Optional[float] = None) -> list:
        """Score several trajectories (padded groups); results in the caller's order."""
        if isinstance(trajectories, (str, bytes, dict, Trajectory)) or not hasattr(trajectories, "__iter__"):
            raise TypeError(f"trajectories must be a list of trajectories, got {type(trajectories).__name__}")
        items = [as_trajectory(t) for t in trajectories]
        return self._score(items, check_threshold(threshold, self._default_threshold))

    def score_streaming(self, messages: Optional[list] = None, tools: Optional[list] = None,
                        trajectory: Any = None, threshold: Optional[float] = None) -> ScoreResult:
        """Score the trajectory so far, after each appended turn and before the next tool call
        runs: the same value as ``score_trajectory``. With a step graph, a trajectory whose
        ids extend (or share an opening with) one scored recently runs only the ids after the
        common prefix (recent states in a bounded LRU cache, as content streams); without one,
        the whole trajectory is scored, as llm-siren does."""
        if self._incremental is None:
            return self.score_trajectory(trajectory, messages=messages, tools=tools, threshold=threshold)
        trajectory = _one_trajectory(trajectory, messages, tools)
        thr = check_threshold(threshold, self._default_threshold)
        tokens = as_tokens(self._ids_of(trajectory))
        self._check_open()
        score = advance_through_cache(self._stream_cache, self._incremental, tokens.text, lambda cached: tokens)
        return ScoreResult(score=float(score), is_harmful=bool(float(score) >= thr), threshold=thr)

    def session(self, tools: Optional[list] = None, threshold: Optional[float] = None) -> TrajectorySession:
        """A per-run session: ``session.append(*messages)`` returns the verdict of the whole run
        so far, running only the ids the append added (plus any earlier turn whose render
        changed); many sessions step together in ``feed_batch``."""
        if tools is not None and (isinstance(tools, (str, bytes, dict)) or not isinstance(tools, (list, tuple))):
            raise TypeError(f"tools must be a list of tool schemas or None, got {type(tools).__name__}")
        thr = None if threshold is None else check_threshold(threshold, self._default_threshold)
        self._check_open()
        return TrajectorySession(self, tools, thr)

    def feed_batch(self, sessions: Sequence[TrajectorySession], appended: Sequence[list]) -> list:
        """Append ``appended[i]`` (a list of messages) to ``sessions[i]`` and score every run,
        stepping them together (groups under the runner's limits). Every argument is checked
        first: a rejected call changes no session. If an engine call fails, sessions of the
        groups already run are advanced, the rest untouched, and the error propagates."""
        if isinstance(sessions, (str, bytes, TrajectorySession)) or not hasattr(sessions, "__iter__"):
            raise TypeError(f"sessions must be a list of trajectory sessions, got {type(sessions).__name__}")
        sessions, appended = list(sessions), list(appended)
        if len(sessions) != len(appended):
            raise ValueError(f"got {len(sessions)} sessions and {len(appended)} lists of messages")
        seen = set()
        prepared = []
        for i, (session, messages) in enumerate(zip(sessions, appended)):
            if id(session) in seen:
                raise ValueError(f"sessions[{i}] appears twice in one feed_batch")
            seen.add(id(session))
            prepared.append(self.prepare_append(session, messages, where=f"[{i}]"))
        return self.feed_prepared(prepared)

    def prepare_append(self, session: TrajectorySession, messages: Sequence[Any],
                       where: str = "") -> "PreparedAppend":
        """Every check of an append and its render and tokenizing, nothing changed: a server
        does this on the request's thread and batches only `feed_prepared`'s engine calls.
        The session must not change until its `feed_prepared` (one append at a time)."""
        if not isinstance(session, TrajectorySession) or session.guard is not self:
            raise ValueError(f"sessions{where} is not a trajectory session of this guard")
        if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, (list, tuple)):
            raise TypeError(f"appended{where} must be a list of messages, got {type(messages).__name__}")
        run, ids = session._prepare(list(messages))
        state = session._held.state
        held = state.ids if state is not None else ()
        shared = next((k for k, (a, b) in enumerate(zip(held, ids)) if a != b), min(len(held), len(ids)))
        return PreparedAppend(session, run, ids, len(ids) - shared, session._held)

    def feed_prepared(self, prepared: Sequence["PreparedAppend"]) -> list:
        """Step prepared appends together (groups under the runner's limits). If an engine
        call fails, sessions of the groups already run are advanced, the rest untouched, and
        the error propagates."""
        prepared = list(prepared)
        if len({id(p.session) for p in prepared}) != len(prepared):
            raise ValueError("a session appears twice in one feed_prepared")
        self._check_open()
        results: list = [None] * len(prepared)
        if self._incremental is None:         # no step graph: each run rescored whole
            scores = self.score_token_ids([p.ids for p in prepared])
            for i, p in enumerate(prepared):
                results[i] = p.session._commit(p.messages, None, float(scores[i]))
            return results

        def commit(i: int, score: float, state) -> None:
            results[i] = prepared[i].session._commit(prepared[i].messages, state, score)
        self._incremental.advance_many([(p.session._held.state, as_tokens(p.ids)) for p in prepared], commit)
        return results

    def __call__(self, *args, **kwargs) -> ScoreResult:
        return self.score_trajectory(*args, **kwargs)

    def render(self, trajectory: Any) -> str:
        """The exact string the head reads for `trajectory` (before tokenizing)."""
        return self._encoder.render(as_trajectory(trajectory))

    def token_ids(self, trajectory: Any) -> list:
        """The ids the graph scores for `trajectory` (rendered, head + tail truncated)."""
        return self._encoder.ids(self.render(trajectory))

    # -- internals ----------------------------------------------------------------------
    def _ids_of(self, trajectory: Trajectory) -> list:
        """Rendered, tokenized and truncated: every input check a score makes."""
        return self._encoder.ids(self._encoder.render(trajectory))

    def _score(self, trajectories: list, threshold: float) -> list:
        self._check_open()
        if not trajectories:
            return []
        id_lists = [self._encoder.ids(self._encoder.render(t)) for t in trajectories]   # every check first
        scores = self.score_token_ids(id_lists)
        return [ScoreResult(score=float(s), is_harmful=bool(float(s) >= threshold), threshold=threshold)
                for s in scores]

    def score_token_ids(self, id_lists: list) -> np.ndarray:
        """Scores of already rendered and truncated trajectories, in padding-aware groups;
        ids scored recently come from a bounded cache (a streaming agent loop rescoring
        the same prefix twice pays once)."""
        scores = np.empty(len(id_lists), dtype=np.float32)
        todo = []
        with self._recent_lock:
            for i, ids in enumerate(id_lists):
                cached = self._recent.get(tuple(ids))
                if cached is None:
                    todo.append(i)
                else:
                    scores[i] = cached
        lengths = [len(id_lists[i]) for i in todo]
        for group in length_groups(lengths, self._max_batch, self._token_budget, self._max_padding):
            rows = [todo[g] for g in group]
            input_ids, mask = self._encoder.pad([id_lists[i] for i in rows])
            scores[rows] = self._runners.score.run(input_ids, mask)
        with self._recent_lock:
            for i in todo:
                self._recent[tuple(id_lists[i])] = scores[i]
                self._recent.move_to_end(tuple(id_lists[i]))
            while len(self._recent) > STREAM_CACHE_SIZE:
                self._recent.popitem(last=False)
        return scores


@dataclass(frozen=True)
class PreparedAppend:
    """An append checked, rendered and tokenized (`prepare_append`), waiting for its engine call."""
    session: TrajectorySession
    messages: tuple
    ids: list
    new_tokens: int           # the ids after the common prefix with what the session holds
    base: Any = None          # what the session held when this was prepared (it changes on commit)


def _one_trajectory(trajectory: Any, messages: Optional[list], tools: Optional[list]) -> Trajectory:
    """A ``Trajectory``, or ``messages`` (and ``tools``) in OpenAI's shape: llm-siren's two
    ways to name one run, and its refusals."""
    if trajectory is not None and messages is not None:
        raise ValueError("Pass either `trajectory` or `messages`, not both.")
    if trajectory is None:
        if messages is None:
            raise ValueError("Provide `trajectory` or `messages`.")
        trajectory = from_openai(messages, tools)
    return as_trajectory(trajectory)


__all__ = ["AgentSirenGuard", "TrajectoryEncoder", "TrajectorySession"]

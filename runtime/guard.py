"""SirenGuard: llm-siren's API over an exported bundle, without torch."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .backends import Runners, backend_name, open_runners, warn_once
from .batching import length_groups
from .bundle import Bundle, read_bundle
from .guard_base import GuardBase
from .hub import download_bundle, is_repo_id
from .private_copy import trim_heap
from .prefixes import PrefixHead, PrefixScores, check_sustain, first_sustained, token_spans
from .result import ScoreResult
from .streaming import (Fed, IncrementalScorer, PreparedFeed, StreamCache, StreamSession, StreamState,
                        advance_through_cache)
from .text import StreamText, clean_text, clean_text_with_offsets, first_final_cut, join_prompt_response
from .tokenization import TextEncoder, Tokenized
from .validation import check_int, check_text, check_texts, check_threshold

DEFAULT_MAX_BATCH = 32
DEFAULT_TOKEN_BUDGET = 16384
DEFAULT_STREAM_CACHE = 64
DEFAULT_STREAM_CACHE_BYTES = 256 * 1024 * 1024


def locate_bundle(bundle_dir, *, revision: Optional[str] = None, cache_dir=None, local_files_only: bool = False,
                  token=None, engines: Optional[bool] = None, backend: Optional[str] = None,
                  verify: bool = True) -> Bundle:
    """A bundle folder, or a Hub repo id ("org/name") fetched into the Hub cache; every listed
    file checked present with its size (each file a runner or the tokenizer loads is hashed
    as it is read, and those very bytes are used: Bundle.read_verified)."""
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision must be a str or None, got {type(revision).__name__}")
    if not Path(bundle_dir).exists() and is_repo_id(str(bundle_dir)):
        check_not_a_mistyped_folder(str(bundle_dir))
        try:
            bundle = download_bundle(str(bundle_dir), revision=revision, cache_dir=cache_dir,
                                     local_files_only=local_files_only, token=token,
                                     engines=engines if engines is not None else backend_name(backend) == "tensorrt")
        except (FileNotFoundError, OSError) as e:
            raise type(e)(f"no folder {str(bundle_dir)!r} here, so it was taken as a Hub repo id: {e}") from e
    else:
        bundle = read_bundle(bundle_dir)
    bundle.verify(contents=False)
    return bundle if verify else bundle.trusting()


def check_not_a_mistyped_folder(source: str) -> None:
    """`demo/bundel` reads like a Hub repo id (owner/name), but when `demo/` is a folder here
    it is a mistyped path: say so at once instead of asking the Hub (retries, then a Hub
    error that never mentions the folder)."""
    parent = Path(source.split("/")[0])
    if parent.is_dir():
        near = sorted(p.name for p in parent.iterdir() if p.is_dir())[:8]
        raise FileNotFoundError(f"no bundle folder {source!r}: the folder {str(parent)!r} exists but holds no "
                                f"{source.split('/', 1)[1]!r}" + (f" (it holds: {', '.join(near)})" if near else "")
                                + f"; a Hub repo id of that name would be fetched from a working directory "
                                  f"without a {str(parent)!r} folder")


#: the class that loads each guard kind
GUARD_CLASSES = {"content": "SirenGuard", "trajectory": "AgentSirenGuard"}


def check_kind(bundle: Bundle, kind: str) -> None:
    """Each guard class refuses the other kind's bundle, naming the one that loads it."""
    if bundle.guard.kind != kind:
        raise ValueError(f"{bundle.directory} is a {bundle.guard.kind!r} guard bundle: load it with "
                         f"siren_runtime.{GUARD_CLASSES[bundle.guard.kind]} (or siren_runtime.load_guard), "
                         f"not {GUARD_CLASSES[kind]}")


class SirenGuard(GuardBase):
    """Scores text for harmfulness from an exported SIREN bundle.

    Same calls and results as ``siren_guard.SirenGuard`` (llm-siren), plus ``stream()``
    sessions and ``feed_batch`` for many streams at once. A guard may be shared by threads
    for ``score``, ``score_batch`` and ``score_streaming``: the tokenizer and an ONNX
    Runtime session run concurrently, the TensorRT backend serializes its one execution
    context, and the stream cache hands a state to one call at a time. A ``stream()``
    session is one thread's at a time. ``close()`` (or ``with``) frees the runners.
    """

    def __init__(self, bundle: Bundle, runners: Runners, *, encoder: Optional[TextEncoder] = None,
                 max_batch_size: int = DEFAULT_MAX_BATCH, token_budget: Optional[int] = None,
                 stream_cache: Optional[StreamCache] = None, max_padding: Optional[float] = None):
        """A guard over runners already opened for `bundle` (``from_pretrained`` opens them;
        tests and embedders inject their own, e.g. a wrapped step runner)."""
        check_kind(bundle, "content")
        if encoder is None:
            encoder = TextEncoder.for_bundle(bundle)
        self._bundle = bundle
        self._runners = runners
        self._encoder = encoder
        self._default_threshold = bundle.inference.default_threshold
        limit = runners.score.limits.max_batch
        self._max_batch = min(int(max_batch_size), limit) if limit else int(max_batch_size)
        if token_budget is None:    # the runner's preference (a CPU's is small), else the GPU-sized default
            token_budget = runners.score.limits.max_tokens or DEFAULT_TOKEN_BUDGET
        self._token_budget = int(token_budget)
        self._max_padding = runners.score.limits.max_padding if max_padding is None else float(max_padding)
        limit = runners.score.limits.max_sequence
        if limit is not None and limit < bundle.inference.max_length:
            warn_once(f"siren_runtime: the {runners.score.name} engine takes at most {limit} tokens of the bundle's "
                      f"{bundle.inference.max_length}; longer texts are refused (rebuild with `siren build`)")
        self._incremental = None
        if runners.step is not None:
            self._incremental = IncrementalScorer(runners.step, bundle.streaming.feature_dim,
                                                  int(max_batch_size), int(token_budget))
        self._stream_cache = stream_cache if stream_cache is not None else StreamCache()
        self._prefix_head = PrefixHead.load(bundle) if bundle.prefix_head is not None else None
        self._closed = False
        trim_heap()    # the tokenizer's and the graphs' parse buffers are freed by now

    @classmethod
    def from_pretrained(cls, bundle_dir: Union[str, Path], device: Optional[str] = None,
                        backend: Optional[str] = None, *, verify: bool = True,
                        max_batch_size: int = DEFAULT_MAX_BATCH,
                        token_budget: Optional[int] = None, max_padding: Optional[float] = None,
                        incremental_streaming: bool = True,
                        stream_cache_size: int = DEFAULT_STREAM_CACHE,
                        stream_cache_bytes: int = DEFAULT_STREAM_CACHE_BYTES, revision: Optional[str] = None,
                        cache_dir: Optional[Union[str, Path]] = None, local_files_only: bool = False,
                        token: Optional[Union[str, bool]] = None, engines: Optional[bool] = None,
                        **backend_options) -> "SirenGuard":
        """Load a bundle made by ``siren export``: a folder, or a Hub repo id ("org/name").

        revision / cache_dir / local_files_only / token: for a Hub bundle, as in
            huggingface_hub (``HF_HOME`` and ``HF_HUB_OFFLINE`` are honoured); the bundle's
            files are fetched into the Hub cache and checked like a local bundle's.
        engines: fetch a Hub bundle's TensorRT engines (default: only for backend="tensorrt").

        device: "cpu", "cuda" or None (GPU when usable, else CPU).
        backend: "tensorrt", "onnxruntime" or None (best available; a fallback is said once).
        verify: check every bundle file against its manifest sha256 before loading;
            pass False only for trusted, read-only bundle paths.
        incremental_streaming: run score_streaming / stream sessions on the bundle's step
            graph (only new tokens); False rescores the whole prefix every call.
        max_batch_size / token_budget / max_padding: score_batch and feed_batch sort by
            length and run groups of at most this many rows, padded tokens, and share of
            padding (default: the runner's: 512 tokens and 0.25 on a CPU, 16,384 and 0.6 on
            a GPU).
        prepack_weights (ONNX Runtime on a CPU): re-lay the weights for the GEMM, ~1.7x
            faster feeds of a few tokens. A bundle with a step graph is scored on that one
            session (whole texts, streams, prefixes), so it pre-packs by default (None) and
            still holds one copy of the weights; False reads the mapped copy in place (the
            least memory, slower small feeds). Without a step graph (or with
            incremental_streaming=False) the scoring graph alone runs, pre-packed only if True.
        stream_cache_size / stream_cache_bytes: bounds of the implicit stream-state cache
            behind score_streaming (least recently used states are evicted).
        """
        if not isinstance(bundle_dir, (str, Path)):
            raise TypeError(f"bundle_dir must be a path, got {type(bundle_dir).__name__}")
        check_int(max_batch_size, "max_batch_size")
        check_int(token_budget, "token_budget", optional=True)
        if max_padding is not None and not (isinstance(max_padding, (int, float)) and 0.0 <= max_padding <= 1.0):
            raise ValueError(f"max_padding must be in [0, 1], got {max_padding!r}")
        bundle = locate_bundle(bundle_dir, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                               token=token, engines=engines, backend=backend, verify=verify)
        check_kind(bundle, "content")
        stream_cache = StreamCache(stream_cache_size, stream_cache_bytes)
        runners = open_runners(bundle, backend=backend, device=device, streaming=incremental_streaming,
                               **backend_options)
        try:
            return cls(bundle, runners, max_batch_size=max_batch_size, token_budget=token_budget,
                       stream_cache=stream_cache, max_padding=max_padding)
        except BaseException:
            runners.close()
            raise

    # -- scoring API ------------------------------------------------------------------
    def score(self, text: Optional[str] = None, *, prompt: Optional[str] = None,
              response: Optional[str] = None, threshold: Optional[float] = None) -> ScoreResult:
        """Score one text, or a prompt/response pair joined as SIREN was trained."""
        text = self._text_of(text, prompt, response)
        thr = check_threshold(threshold, self._default_threshold)
        return self._score_texts([text], thr)[0]

    @staticmethod
    def _text_of(text: Optional[str], prompt: Optional[str], response: Optional[str]) -> str:
        """The one text a `text` or `prompt`/`response` call scores (llm-siren's rules)."""
        if text is not None and (prompt is not None or response is not None):
            raise ValueError("Pass either `text` or `prompt`/`response`, not both.")
        if text is not None:
            return check_text(text, "text")
        if prompt is None and response is None:
            raise ValueError("Provide `text`, or at least one of `prompt`/`response`.")
        for value, name in ((prompt, "prompt"), (response, "response")):
            if value is not None:
                check_text(value, name)
        return join_prompt_response(prompt, response)

    def score_batch(self, texts: Sequence[str], threshold: Optional[float] = None) -> list[ScoreResult]:
        """Score many texts; results come back in the caller's order."""
        items = check_texts(texts)
        thr = check_threshold(threshold, self._default_threshold)
        return self._score_texts(items, thr)

    def score_streaming(self, response_so_far: str, threshold: Optional[float] = None) -> ScoreResult:
        """Score a growing prefix as a whole (same value as ``score(prefix)``).

        With a streaming bundle, a prefix extending a recently scored one runs only the new
        tokens (recent stream states are kept in a bounded LRU cache)."""
        check_text(response_so_far, "response_so_far")
        thr = check_threshold(threshold, self._default_threshold)
        self._check_open()
        if self._incremental is None:
            return self._score_texts([response_so_far], thr)[0]
        cleaned = clean_text(response_so_far)
        score = advance_through_cache(self._stream_cache, self._incremental, cleaned, lambda cached: (
            self._encoder.tokenize_resuming(cleaned, cached.tokens if cached is not None else None)))
        return self._result(score, thr)

    def stream(self, threshold: Optional[float] = None, *, keep_text: bool = True) -> StreamSession:
        """An explicit stream session (``feed(delta)``, ``score``, ``reset()``, context manager)
        with private state, for servers holding many concurrent streams. keep_text=False: the
        session keeps only what scoring needs (``text`` is not available, ``chars`` is)."""
        self._check_open()
        return StreamSession(self, threshold, keep_text=keep_text)

    def feed_batch(self, sessions: Sequence[StreamSession], deltas: Sequence[str]) -> list[ScoreResult]:
        """Append ``deltas[i]`` to ``sessions[i]`` and score every session's whole text,
        stepping all of them together (groups under the runner's limits and the token
        budget). Every argument is checked first: a rejected call changes no session. If an
        engine call fails, sessions of the groups already run are advanced, the rest are
        untouched, and the error propagates."""
        if isinstance(sessions, (str, bytes, StreamSession)) or not hasattr(sessions, "__iter__"):
            raise TypeError(f"sessions must be a list of stream sessions, got {type(sessions).__name__}")
        if isinstance(deltas, (str, bytes)) or not hasattr(deltas, "__iter__"):
            raise TypeError(f"deltas must be a list of strings, got {type(deltas).__name__}")
        sessions, deltas = list(sessions), list(deltas)
        if len(sessions) != len(deltas):
            raise ValueError(f"got {len(sessions)} sessions and {len(deltas)} deltas")
        seen = set()
        for i, (session, delta) in enumerate(zip(sessions, deltas)):
            if not isinstance(session, StreamSession) or session.guard is not self:
                raise ValueError(f"sessions[{i}] is not a stream session of this guard")
            if id(session) in seen:
                raise ValueError(f"sessions[{i}] appears twice in one feed_batch")
            seen.add(id(session))
            check_text(delta, f"deltas[{i}]")
        self._check_open()
        return self.feed_prepared([self._prepare(session, delta) for session, delta in zip(sessions, deltas)])

    def prepare_feed(self, session: StreamSession, delta: str) -> PreparedFeed:
        """The host-side half of feeding `delta` to `session` (cleaning, tokenizing), without
        touching the session or the engine: a server runs it on its request's thread, so one
        large delta does not hold up the engine calls of other streams. Valid while the
        session is unchanged (``feed_prepared`` redoes it otherwise)."""
        if not isinstance(session, StreamSession) or session.guard is not self:
            raise ValueError("session is not a stream session of this guard")
        check_text(delta, "delta")
        self._check_open()
        return self._prepare(session, delta)

    def _prepare(self, session: StreamSession, delta: str) -> PreparedFeed:
        fed = session.fed
        if fed.final:          # past max_length for good: only the count moves
            return PreparedFeed(session, fed, delta, StreamText(chars=fed.text.chars + len(delta)), None)
        text = fed.text.extended(delta)
        return PreparedFeed(session, fed, delta, text, self._encoder.tokenize_resuming(text.cleaned, fed.tokens))

    def feed_prepared(self, feeds: Sequence[PreparedFeed]) -> list[ScoreResult]:
        """``feed_batch`` over prepared feeds (``prepare_feed``), one per session."""
        feeds = list(feeds)
        if len({id(f.session) for f in feeds}) != len(feeds):
            raise ValueError("a session appears twice in one feed")
        self._check_open()
        # a feed prepared on a state its session has since left is prepared again
        feeds = [f if f.base is f.session.fed else self._prepare(f.session, f.delta) for f in feeds]
        live = [i for i, f in enumerate(feeds) if not f.base.final]

        def commit(i: int, score: float, state: Optional[StreamState]) -> None:
            feed = feeds[i]
            text, ids, result = feed.text, feed.tokens, self._result(score, feed.session.threshold)
            onset = feed.base.onset
            if onset is None and state is not None:
                onset = self._stream_onset(feed, state, score)
            if self._encoder.is_final(ids, len(text.head)):   # drop the text and the KV state
                feed.session._commit(feed.delta, Fed(StreamText(chars=text.chars), Tokenized("", ids.ids), None,
                                                     result, final=True, onset=onset))
            else:
                feed.session._commit(feed.delta, Fed(text, ids, state, result, onset=onset))
        for feed in feeds:
            if feed.base.final:       # the same score, nothing kept
                feed.session._commit(feed.delta, replace(feed.base, text=feed.text))
        if self._incremental is None:
            scores = self.score_token_ids([list(feeds[i].tokens.ids) for i in live]) if live else []
            for i, score in zip(live, scores):
                commit(i, score, None)
        elif live:
            self._incremental.advance_many([(feeds[i].base.state, feeds[i].tokens) for i in live],
                                           lambda k, score, state: commit(live[k], score, state))
        return [feed.session.score for feed in feeds]

    def _stream_onset(self, feed: PreparedFeed, state: StreamState, score: float) -> Optional[int]:
        """Where in the stream (a character offset of everything fed) the running score first
        reached the session's threshold among this feed's new tokens, from the sums the step
        already returned (no engine call); None when it did not, or without a prefix head."""
        if self._prefix_head is None:
            return None
        first = state.start + 1                       # sums[first] is after the first new token
        scores = self._prefix_head.scores(state.sums[first:], first_count=first)
        hit = first_sustained(scores, feed.session.threshold)
        if hit is None and score >= feed.session.threshold:
            hit = len(scores) - 1                     # flagged by the step's own score: its last token
        if hit is None:
            return None
        token = state.start + hit
        _, offsets = self._encoder.ids_and_offsets(feed.text.cleaned)   # once per stream: the first crossing
        # the text this feed could change: the raw tail before it plus the delta, whose cleaning
        # is the cleaned text after the settled head it started from (see StreamText)
        base = feed.base.text
        opened = base.chars - len(base.tail)          # where that raw text begins
        at = offsets[token][0] - len(base.head) if token < len(offsets) else -1
        if at < 0:                                    # a token rolled back into text settled before
            return opened
        _, starts, _ = clean_text_with_offsets(base.tail + feed.delta)
        return opened + (starts[at] if at < len(starts) else len(base.tail) + len(feed.delta))

    # -- where harm starts ---------------------------------------------------------------
    def score_prefixes(self, text: Optional[str] = None, *, prompt: Optional[str] = None,
                       response: Optional[str] = None, threshold: Optional[float] = None) -> PrefixScores:
        """The score after every token of the (cleaned, truncated) text, from one step-graph
        pass, with each token's character span in the caller's text; ``.onset()`` says where
        harm starts. prompt/response are joined as for ``score`` (spans are in the joined text)."""
        return self.score_prefixes_batch([self._text_of(text, prompt, response)], threshold)[0]

    def score_prefixes_batch(self, texts: Sequence[str], threshold: Optional[float] = None) -> list[PrefixScores]:
        """``score_prefixes`` for many texts, stepped together (groups as in ``feed_batch``)."""
        items = check_texts(texts)
        thr = check_threshold(threshold, self._default_threshold)
        self._check_open()
        if self._incremental is None or self._prefix_head is None:
            missing = ("a prefix head (prefix_head.npz: bundles exported before it have none)"
                       if self._prefix_head is None else
                       "a streaming step graph on this guard (exported with --no-streaming, loaded with "
                       "incremental_streaming=False, or no backend here runs it)")
            raise RuntimeError(f"prefix scores need {missing}; re-export the bundle with `siren export`")
        prepared = []
        for text in items:
            cleaned, starts, ends = clean_text_with_offsets(self._model_text(text))
            ids, offsets = self._encoder.ids_and_offsets(cleaned)
            prepared.append((text, cleaned, starts, ends, ids, offsets))
        sums: dict = {}
        if prepared:
            self._incremental.advance_many([(None, Tokenized(p[1], tuple(p[4]))) for p in prepared],
                                           lambda i, score, state: sums.__setitem__(i, state.sums[1:]))
        prefix = len(self._encoder.prefix or ())
        return [PrefixScores(text=text, token_ids=tuple(ids), scores=self._prefix_head.scores(sums[i]),
                             spans=token_spans(offsets, starts, ends, prefix), threshold=thr)
                for i, (text, _, starts, ends, ids, offsets) in enumerate(prepared)]

    def _model_text(self, text: str) -> str:
        """The part of `text` whose tokens reach the model: a prefix ending at a final cut
        (text.first_final_cut) whose cleaning holds a settled token prefix, so cleaning (and
        the character map, ~100 bytes a character) costs what the first max_length tokens cost
        and not what a 50 MB text does; `text` itself when it is short or has no such cut."""
        want = 2 * self._encoder.long_text_chars()
        while want < len(text):
            cut = first_final_cut(text, want)
            if not cut:
                break
            if self._encoder.settled_prefix(clean_text(text[:cut])) is not None:
                return text[:cut]
            want = 2 * cut
        return text

    def onset(self, text: str, threshold: Optional[float] = None, sustain: int = 1) -> Optional[int]:
        """The character offset of `text` where harm starts (see PrefixScores.onset), or None."""
        check_sustain(sustain)
        return self.score_prefixes(text, threshold=threshold).onset(sustain=sustain)

    @property
    def prefix_scores_available(self) -> bool:
        return self._incremental is not None and self._prefix_head is not None

    @property
    def stream_cache(self) -> StreamCache:
        return self._stream_cache

    def __call__(self, *args, **kwargs) -> ScoreResult:
        return self.score(*args, **kwargs)

    def token_ids(self, text: str) -> list[int]:
        """The token ids the guard scores for `text` (cleaned, truncated to max_length)."""
        check_text(text, "text")
        return self._encoder.token_ids([clean_text(self._model_text(text))])[0]

    # -- internals --------------------------------------------------------------------
    def score_token_ids(self, id_lists: list[list[int]]) -> np.ndarray:
        """Scores for already-tokenized texts, run in padding-aware groups."""
        self._check_open()
        scores = np.empty(len(id_lists), dtype=np.float32)
        lengths = [len(ids) for ids in id_lists]
        self._check_fits(lengths)
        for group in length_groups(lengths, self._max_batch, self._token_budget, self._max_padding):
            input_ids, attention_mask = self._encoder.pad([id_lists[i] for i in group])
            scores[group] = self._runners.score.run(input_ids, attention_mask)
        return scores

    def _check_fits(self, lengths: list[int]) -> None:
        """Refuse, before any work, texts longer than the scoring runner takes (a TensorRT
        engine built with ``--max-seq`` below the bundle's max_length)."""
        limit = self._runners.score.limits.max_sequence
        if limit is not None and lengths and max(lengths) > limit:
            raise ValueError(f"a text has {max(lengths)} tokens; this {self.backend} engine takes at most {limit} "
                             f"(built with --max-seq {limit}, the bundle's max_length is {self.max_length}): "
                             f"rebuild with `siren build --max-seq {self.max_length}`")

    @staticmethod
    def _result(score: float, threshold: float) -> ScoreResult:
        return ScoreResult(score=float(score), is_harmful=bool(float(score) >= threshold), threshold=threshold)

    def _scores(self, texts: list[str]) -> np.ndarray:
        return self.score_token_ids(self._encoder.token_ids([clean_text(self._model_text(t)) for t in texts]))

    def _score_texts(self, texts: list[str], threshold: float) -> list[ScoreResult]:
        if not texts:
            return []
        return [self._result(s, threshold) for s in self._scores(texts)]

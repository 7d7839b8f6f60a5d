"""SirenGuard: llm-siren's API over an exported bundle, without torch."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from .backends import create_runner, create_step_runner, warn_once
from .errors import BackendUnavailableError
from .batching import length_groups
from .manifest import read_manifest, safe_relative_path, verify_files
from .result import ScoreResult
from .streaming import IncrementalScorer, StreamCache, StreamSession, StreamState, common_prefix
from .text import clean_text, join_prompt_response
from .tokenization import TextEncoder
from .validation import check_text, check_texts, check_threshold

DEFAULT_MAX_BATCH = 32
DEFAULT_TOKEN_BUDGET = 16384
# Share of padding a batch group may hold: on a CPU every padded token costs a real
# token's compute; a GPU at small batch is bound by weight reads, so fuller batches win.
DEFAULT_MAX_PADDING = {"cpu": 0.25, "cuda": 0.6}
DEFAULT_STREAM_CACHE = 64
DEFAULT_STREAM_CACHE_BYTES = 256 * 1024 * 1024


class SirenGuard:
    """Scores text for harmfulness from an exported SIREN bundle.

    Same calls and results as ``siren_guard.SirenGuard`` (llm-siren). A guard may be
    shared by threads for ``score``, ``score_batch`` and ``score_streaming``: the tokenizer
    and an ONNX Runtime session run concurrently, the TensorRT backend serializes its one
    execution context, and the stream cache is locked. A ``stream()`` session is one
    thread's at a time.
    """

    def __init__(self, bundle_dir: Path, manifest: dict[str, Any], runner, encoder: TextEncoder,
                 max_batch_size: int = DEFAULT_MAX_BATCH, token_budget: int = DEFAULT_TOKEN_BUDGET,
                 incremental: Optional[IncrementalScorer] = None, stream_cache: Optional[StreamCache] = None,
                 max_padding: Optional[float] = None):
        self._bundle_dir = Path(bundle_dir)
        self._manifest = manifest
        self._runner = runner
        self._encoder = encoder
        self._default_threshold = float(manifest["inference"]["default_threshold"])
        self._max_batch = int(max_batch_size)
        self._token_budget = int(token_budget)
        self._incremental = incremental
        self._max_padding = (DEFAULT_MAX_PADDING.get(runner.device, 0.6) if max_padding is None
                             else float(max_padding))
        self._stream_cache = stream_cache if stream_cache is not None else StreamCache()

    @classmethod
    def from_pretrained(cls, bundle_dir: Union[str, Path], device: Optional[str] = None,
                        backend: Optional[str] = None, *, verify: bool = True,
                        max_batch_size: int = DEFAULT_MAX_BATCH,
                        token_budget: int = DEFAULT_TOKEN_BUDGET, max_padding: Optional[float] = None,
                        incremental_streaming: bool = True,
                        stream_cache_size: int = DEFAULT_STREAM_CACHE,
                        stream_cache_bytes: int = DEFAULT_STREAM_CACHE_BYTES, **backend_options) -> "SirenGuard":
        """Load a bundle made by ``siren export``.

        device: "cpu", "cuda" or None (GPU when usable, else CPU).
        backend: "onnxruntime" or None (best available).
        verify: check every bundle file against its manifest sha256 before loading;
            pass False only for trusted, read-only bundle paths.
        incremental_streaming: run score_streaming / stream sessions on the bundle's step
            graph (only new tokens); False rescores the whole prefix every call.
        max_batch_size / token_budget / max_padding: score_batch sorts texts by length and
            runs groups of at most this many rows, padded tokens, and share of padding
            (default 0.25 on CPU, 0.6 on GPU).
        stream_cache_size / stream_cache_bytes: bounds of the implicit stream-state cache
            behind score_streaming (least recently used states are evicted).
        """
        if not isinstance(bundle_dir, (str, Path)):
            raise TypeError(f"bundle_dir must be a path, got {type(bundle_dir).__name__}")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
            raise ValueError(f"token_budget must be a positive int, got {token_budget!r}")
        if max_padding is not None and not (isinstance(max_padding, (int, float)) and 0.0 <= max_padding <= 1.0):
            raise ValueError(f"max_padding must be in [0, 1], got {max_padding!r}")
        bundle_dir = Path(bundle_dir)
        manifest = read_manifest(bundle_dir)
        if verify:
            verify_files(bundle_dir, manifest)
        inference = manifest["inference"]
        encoder = TextEncoder(safe_relative_path(bundle_dir, manifest["tokenizer"]["path"]),
                              max_length=inference["max_length"],
                              pad_token_id=inference["pad_token_id"])
        stream_cache = StreamCache(stream_cache_size, stream_cache_bytes)
        runner = create_runner(bundle_dir, manifest, backend=backend, device=device, **backend_options)
        incremental = None
        if incremental_streaming and isinstance(manifest.get("streaming"), dict):
            step = None
            for name in dict.fromkeys([runner.name, "onnxruntime"]):
                try:
                    step = create_step_runner(bundle_dir, manifest, name, runner.device, **backend_options)
                    break
                except BackendUnavailableError:
                    continue
            if step is None:
                warn_once("siren_runtime: no backend runs the streaming step graph here; "
                          "score_streaming rescores the prefix")
            else:
                incremental = IncrementalScorer(step, manifest["streaming"])
        return cls(bundle_dir, manifest, runner, encoder, max_batch_size, token_budget, incremental, stream_cache,
                   max_padding)

    # -- properties -------------------------------------------------------------------
    @property
    def default_threshold(self) -> float:
        return self._default_threshold

    @property
    def backend(self) -> str:
        return self._runner.name

    @property
    def device(self) -> str:
        return self._runner.device

    @property
    def max_length(self) -> int:
        return self._encoder.max_length

    @property
    def manifest(self) -> dict[str, Any]:
        return self._manifest

    # -- scoring API ------------------------------------------------------------------
    def score(self, text: Optional[str] = None, *, prompt: Optional[str] = None,
              response: Optional[str] = None, threshold: Optional[float] = None) -> ScoreResult:
        """Score one text, or a prompt/response pair joined as SIREN was trained."""
        if text is not None and (prompt is not None or response is not None):
            raise ValueError("Pass either `text` or `prompt`/`response`, not both.")
        if text is None:
            if prompt is None and response is None:
                raise ValueError("Provide `text`, or at least one of `prompt`/`response`.")
            if prompt is not None:
                check_text(prompt, "prompt")
            if response is not None:
                check_text(response, "response")
            text = join_prompt_response(prompt, response)
        else:
            check_text(text, "text")
        thr = check_threshold(threshold, self._default_threshold)
        return self._score_texts([text], thr)[0]

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
        if self._incremental is None:
            return self._score_texts([response_so_far], thr)[0]
        cleaned = clean_text(response_so_far)
        key, state, _ = self._stream_cache.best_match(cleaned)
        score, new_state = self._advance_stream(cleaned, state)
        # the same stream moving on (its last tokens may have been re-merged) replaces its
        # entry; a different continuation of a shared opening gets its own
        replace = key if state is not None and common_prefix(state.ids, new_state.ids) >= state.start else None
        self._stream_cache.store(new_state, replace)
        return self._result(score, thr)

    def stream(self, threshold: Optional[float] = None) -> StreamSession:
        """An explicit stream session (``feed(delta)``, ``score``, ``reset()``, context manager)
        with private state, for servers holding many concurrent streams."""
        return StreamSession(self, threshold)

    @property
    def stream_cache(self) -> StreamCache:
        return self._stream_cache

    @property
    def incremental_streaming(self) -> bool:
        return self._incremental is not None

    def __call__(self, *args, **kwargs) -> ScoreResult:
        return self.score(*args, **kwargs)

    # -- internals --------------------------------------------------------------------
    def score_token_ids(self, id_lists: list[list[int]]) -> np.ndarray:
        """Scores for already-tokenized texts, run in padding-aware groups."""
        scores = np.empty(len(id_lists), dtype=np.float32)
        lengths = [len(ids) for ids in id_lists]
        for group in length_groups(lengths, self._max_batch, self._token_budget, self._max_padding):
            input_ids, attention_mask = self._encoder.pad([id_lists[i] for i in group])
            scores[group] = self._runner.run(input_ids, attention_mask)
        return scores

    @staticmethod
    def _result(score: float, threshold: float) -> ScoreResult:
        return ScoreResult(score=float(score), is_harmful=bool(float(score) >= threshold), threshold=threshold)

    def _score_stream_text(self, text: str, state: Optional[StreamState], threshold: float):
        """A session's step: (result, new state); full rescoring without a step graph."""
        if self._incremental is None:
            return self._score_texts([text], threshold)[0], None
        score, new_state = self._advance_stream(clean_text(text), state)
        return self._result(score, threshold), new_state

    def _advance_stream(self, cleaned: str, state: Optional[StreamState]) -> tuple[float, StreamState]:
        """Tokenize `cleaned` resuming from `state`'s text and run only the new tokens."""
        tokens = self._encoder.tokenize_resuming(cleaned, state.tokens if state is not None else None)
        return self._incremental.advance(state or self._incremental.new_state(), tokens)

    def _score_texts(self, texts: list[str], threshold: float) -> list[ScoreResult]:
        if not texts:
            return []
        id_lists = self._encoder.token_ids([clean_text(t) for t in texts])
        scores = self.score_token_ids(id_lists)
        return [self._result(s, threshold) for s in scores]

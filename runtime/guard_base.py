"""What every guard kind shares: its bundle, runners and limits as properties, closing, and
the closed check. :class:`~siren_runtime.guard.SirenGuard` (text) and
:class:`~siren_runtime.agent_guard.AgentSirenGuard` (trajectories) add their scoring."""
from __future__ import annotations

from typing import Any, TypeVar

from .backends import Runners
from .bundle import Bundle

G = TypeVar("G", bound="GuardBase")


class GuardBase:
    """A subclass's constructor sets ``_bundle``, ``_runners``, ``_encoder``, ``_max_batch``,
    ``_token_budget``, ``_default_threshold``, ``_stream_cache``, ``_incremental`` and
    ``_closed``."""

    def close(self) -> None:
        """Free the runners (sessions, engines, stream states); later calls raise."""
        self._closed = True
        self._forget()
        self._stream_cache.clear()
        self._runners.close()

    def _forget(self) -> None:
        """What a guard kind drops on close besides its stream cache (nothing here)."""

    def __enter__(self: G) -> G:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} is closed")

    @property
    def default_threshold(self) -> float:
        return self._default_threshold

    @property
    def base_model_id(self) -> str:
        """The backbone the bundle was exported from (as llm-siren's guards name it)."""
        return str((self._bundle.manifest.get("backbone") or {}).get("model_id", ""))

    @property
    def backend(self) -> str:
        return self._runners.score.name

    @property
    def device(self) -> str:
        return self._runners.score.device

    @property
    def batch_invariant(self) -> bool:
        """Whether a text's score is bit-identical whatever shares its batch: ONNX Runtime on
        the CPU with a bundle exported for it (bundle.model.batch_invariant) or pre-packed
        weights. GPU kernels and int8 activations (one scale per batch) give no such promise."""
        return bool(getattr(self._runners.score, "batch_invariant", False))

    @property
    def max_length(self) -> int:
        return self._encoder.max_length

    @property
    def limits(self) -> dict:
        """What one engine call takes at most (rows, padded tokens) and the longest input
        in tokens: what a server reports at /info."""
        return {"max_batch_size": self._max_batch, "token_budget": self._token_budget,
                "max_length": self.max_length}

    @property
    def manifest(self) -> dict[str, Any]:
        """The bundle's manifest (a copy)."""
        return self._bundle.raw()

    @property
    def bundle(self) -> Bundle:
        return self._bundle

    @property
    def runners(self) -> Runners:
        """The backend runners this guard scores with (their limits, their names)."""
        return self._runners

    @property
    def incremental_streaming(self) -> bool:
        """Whether streams and score_streaming run only the new tokens (a step graph is loaded)."""
        return self._incremental is not None

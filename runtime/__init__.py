"""Torch-free SIREN guard runtime: score text from an exported bundle.

Imports neither torch nor transformers; the backends (ONNX Runtime, TensorRT) are
imported lazily, only when a guard is created with them.
"""
from .errors import BundleError, BackendUnavailableError
from .result import ScoreResult
from .guard import SirenGuard
from .failsafe import FailClosedGuard

__version__ = "0.1.0"

__all__ = ["SirenGuard", "FailClosedGuard", "ScoreResult", "BundleError", "BackendUnavailableError", "__version__"]

"""Torch-free SIREN guard runtime: score text, or agent trajectories, from an exported bundle.

Imports neither torch nor transformers; the backends (ONNX Runtime, TensorRT) are
imported lazily, only when a guard is created with them.
"""
from .errors import BundleError, BackendUnavailableError
from .result import ScoreResult
from .guard import SirenGuard
from .agent_guard import AgentSirenGuard
from .trajectory import Trajectory, Turn, from_openai
from .failsafe import FailClosedGuard
from .loading import load_guard

__version__ = "0.1.0"


def package_version() -> str:
    """The installed distribution's version (the one `pip` reports), else this module's."""
    from importlib import metadata
    try:
        return metadata.version("siren-deploy")
    except metadata.PackageNotFoundError:
        return __version__

__all__ = ["SirenGuard", "AgentSirenGuard", "load_guard", "Trajectory", "Turn", "from_openai", "FailClosedGuard",
           "ScoreResult", "BundleError", "BackendUnavailableError", "__version__", "package_version"]

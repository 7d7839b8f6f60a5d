"""load_guard: the guard a bundle declares (llm-siren's load_guard, over bundles)."""
from __future__ import annotations

from pathlib import Path
from typing import Union


def load_guard(bundle_dir: Union[str, Path], **kwargs):
    """A SirenGuard for a content bundle, an AgentSirenGuard for a trajectory bundle (the
    manifest's guard.kind); keyword arguments go to that class's from_pretrained."""
    from .agent_guard import AgentSirenGuard
    from .guard import SirenGuard, locate_bundle
    options = {k: kwargs[k] for k in ("revision", "cache_dir", "local_files_only", "token") if k in kwargs}
    kind = locate_bundle(bundle_dir, **options).guard.kind
    cls = AgentSirenGuard if kind == "trajectory" else SirenGuard
    return cls.from_pretrained(bundle_dir, **kwargs)


__all__ = ["load_guard"]

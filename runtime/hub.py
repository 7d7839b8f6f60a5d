"""Bundles on the Hugging Face Hub: how a node without torch receives a guard.

A bundle repo is a bundle folder uploaded as is (``hf upload org/name BUNDLE``). Getting it
reads the manifest first, then downloads exactly the files it lists, from the same commit,
into the normal Hub cache (``HF_HOME``, ``HF_HUB_OFFLINE`` and ``cache_dir`` are
honoured). TensorRT engines are GPU- and version-specific and large, so they are fetched
only when asked for. The files are then checked like a local bundle's: the guard hashes
each file as it reads it from the cache, so a tampered cached file is refused.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from .bundle import MANIFEST_NAME, Bundle, read_bundle
from .errors import install_hint

#: owner/name as the Hub spells repo ids (a path that exists locally always wins)
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
#: the model card beside the manifest (not part of the contract: never read by the runtime)
CARD_NAME = "README.md"


def is_repo_id(source) -> bool:
    return isinstance(source, str) and bool(_REPO_ID.match(source)) and ".." not in source


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise ModuleNotFoundError("bundles from the Hugging Face Hub need huggingface_hub: " + install_hint("hub"),
                                  name="huggingface_hub") from None
    return huggingface_hub


def _unavailable(repo_id: str, revision: Optional[str], error: Exception) -> Exception:
    """One clear error for every way the Hub can say no."""
    errors = _hub().errors
    where = f"{repo_id}{f'@{revision}' if revision else ''}"
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, errors.LocalEntryNotFoundError):
        return FileNotFoundError(f"bundle {where} is not in the local Hugging Face cache and the Hub cannot be "
                                 f"reached (offline or local_files_only); download it once online ({first})")
    if isinstance(error, errors.RevisionNotFoundError):
        return FileNotFoundError(f"bundle {where}: revision {revision!r} not found on the Hub")
    if isinstance(error, errors.RepositoryNotFoundError):
        return FileNotFoundError(f"bundle {where}: no such repository on the Hub (or no access: pass token=)")
    if isinstance(error, errors.EntryNotFoundError):
        return FileNotFoundError(f"{where} is not a SIREN bundle repository: {MANIFEST_NAME} is missing "
                                 "(publish a folder made by `siren export`)")
    return OSError(f"could not download bundle {where} from the Hugging Face Hub: {type(error).__name__}: {first}")


def download_bundle(repo_id: str, *, revision: Optional[str] = None, cache_dir=None,
                    local_files_only: bool = False, token=None, engines: bool = False) -> Bundle:
    """The bundle at `repo_id` (and `revision`), in the local Hub cache; downloads what is
    missing. Returns the validated bundle (its engines dropped unless `engines`)."""
    hub = _hub()
    options = dict(cache_dir=str(cache_dir) if cache_dir is not None else None,
                   local_files_only=local_files_only, token=token)
    try:
        manifest = Path(hub.hf_hub_download(repo_id, MANIFEST_NAME, revision=revision, **options))
    except Exception as e:
        raise _unavailable(repo_id, revision, e) from e
    snapshot = manifest.parent
    bundle = read_bundle(snapshot)
    wanted = [rel for rel in bundle.files if engines or rel not in _engine_files(bundle)]
    try:    # the commit the manifest came from: every file of one bundle from one commit
        hub.snapshot_download(repo_id, revision=snapshot.name, allow_patterns=[MANIFEST_NAME, CARD_NAME, *wanted],
                              **options)
    except Exception as e:
        raise _unavailable(repo_id, revision, e) from e
    return bundle if engines else bundle.without_engines()


def _engine_files(bundle: Bundle) -> set:
    return {e.path for e in bundle.engines}


__all__ = ["download_bundle", "is_repo_id", "CARD_NAME"]

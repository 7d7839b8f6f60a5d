"""The bundle manifest (`siren_bundle.json`): the one format that connects export,
engines and runtime.

The exporter writes it with :func:`write_manifest`; every later stage reads it with
:func:`read_manifest`. Facts live here once: file paths, checksums, shapes and the
scoring settings the runtime needs. Checksum helpers live here too, so writer and reader
hash the same way.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import BundleError

MANIFEST_NAME = "siren_bundle.json"
FORMAT_NAME = "siren-bundle"
FORMAT_VERSION = 1

_REQUIRED_SECTIONS = ("backbone", "siren", "inference", "model", "tokenizer", "files")
_HASH_CHUNK = 8 * 1024 * 1024


def sha256_file(path: Path) -> str:
    """Streamed sha256, so multi-GB weight files never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def safe_relative_path(bundle_dir: Path, rel: str) -> Path:
    """Resolve a manifest path, refusing anything that could escape the bundle."""
    if not isinstance(rel, str) or not rel:
        raise BundleError(f"{bundle_dir}: manifest holds an invalid file path {rel!r}")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or "\\" in rel or os.path.isabs(rel):
        raise BundleError(f"{bundle_dir}: manifest path {rel!r} escapes the bundle directory")
    return bundle_dir / pure


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    """Load and structurally validate a bundle's manifest (no file hashing here)."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.exists():
        raise FileNotFoundError(f"bundle not found: {bundle_dir} does not exist")
    if not bundle_dir.is_dir():
        raise BundleError(f"{bundle_dir} is not a bundle directory (it is a file)")
    path = bundle_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{bundle_dir} is not a SIREN bundle: {MANIFEST_NAME} is missing "
            "(create one with `siren export`)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{path}: not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path}: bundle format version {version!r} is not supported by this runtime "
            f"(supports {FORMAT_VERSION}); re-export the bundle with a matching `siren`")
    missing = [s for s in _REQUIRED_SECTIONS if not isinstance(manifest.get(s), dict)]
    if missing:
        raise BundleError(f"{path}: manifest lacks section(s) {', '.join(missing)}")
    for rel in manifest["files"]:
        safe_relative_path(bundle_dir, rel)
    return manifest


def verify_files(bundle_dir: Path, manifest: dict[str, Any], only=None) -> None:
    """Check that every recorded file exists with its recorded size and sha256.

    Done before any session or engine is created: a truncated or altered weight file
    must be refused, not half-loaded.
    """
    bundle_dir = Path(bundle_dir)
    for rel, meta in manifest["files"].items():
        if only is not None and rel not in only:
            continue
        path = safe_relative_path(bundle_dir, rel)
        if not path.is_file():
            raise FileNotFoundError(f"{bundle_dir}: bundle file {rel} is missing")
        size = path.stat().st_size
        if "bytes" in meta and size != meta["bytes"]:
            raise BundleError(f"{path}: size {size} differs from the manifest's "
                              f"{meta['bytes']} (truncated or altered file)")
        if sha256_file(path) != meta.get("sha256"):
            raise BundleError(f"{path}: sha256 does not match the manifest (altered or corrupted file)")


def describe_file(bundle_dir: Path, rel: str) -> dict[str, Any]:
    path = safe_relative_path(Path(bundle_dir), rel)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest (format fields filled in), after recording file checksums."""
    manifest = dict(manifest)
    manifest["format"] = FORMAT_NAME
    manifest["format_version"] = FORMAT_VERSION
    path = Path(bundle_dir) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path

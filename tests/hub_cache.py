"""TEST HELPER: put a folder into a Hugging Face cache exactly as huggingface_hub lays one out
(models--owner--name/{blobs,refs,snapshots}), so offline loading runs the real
hf_hub_download / snapshot_download code paths against it.

Blob names follow the Hub: LFS files (weights, graphs) by their sha256, other files by their
git blob sha1; snapshot entries are relative symlinks into blobs/.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

LFS_SUFFIXES = {".onnx", ".data", ".plan", ".safetensors", ".bin"}


def _blob_name(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix in LFS_SUFFIXES or len(data) > 10 * 1024 * 1024:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def populate(cache_dir: Path, repo_id: str, folder: Path, revision: str = "main", skip=()) -> Path:
    """Cache `folder` as `repo_id` at a new commit that `revision` (a branch or tag) points to;
    returns the snapshot directory. Files whose relative path is in `skip` are left out
    (as when only part of a repo was downloaded)."""
    storage = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    commit = secrets.token_hex(20)
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for src in sorted(Path(folder).rglob("*")):
        rel = src.relative_to(folder).as_posix()
        if not src.is_file() or rel in skip:
            continue
        blob = storage / "blobs" / _blob_name(src)
        if not blob.exists():
            blob.write_bytes(src.read_bytes())
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    return snapshot

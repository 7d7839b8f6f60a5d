"""The files of a bundle: streamed hashing, manifest paths that cannot escape the bundle,
and the staging folder a bundle is written in before it is published atomically.

Apart from the manifest's meaning (:mod:`siren_runtime.bundle`): every stage that writes a
bundle (export, quantize, build) stages and publishes it through here, and the runtime reads
each file it loads through :func:`read_into_memory` or a private copy
(:mod:`siren_runtime.private_copy`), hashing what it reads.
"""
from __future__ import annotations

import errno
try:
    import fcntl        # POSIX: staging folders are locked while a run writes them
except ImportError:     # Windows: no locks, stale staging folders are left alone
    fcntl = None
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from .errors import BundleError

#: files are hashed and read in pieces of this size (multi-GB weights never sit in one buffer)
HASH_CHUNK = 8 * 1024 * 1024

log = logging.getLogger("siren_runtime.bundle")          # one logger for the bundle's messages


# -- file-level helpers ----------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """Streamed sha256, so multi-GB weight files never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def safe_relative_path(bundle_dir: Path, rel: str) -> Path:
    """Resolve a manifest path, refusing anything that could escape the bundle."""
    if not isinstance(rel, str) or not rel or rel in (".", "./"):
        raise BundleError(f"{bundle_dir}: manifest holds an invalid file path {rel!r}")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or "\\" in rel or os.path.isabs(rel) or "\x00" in rel:
        raise BundleError(f"{bundle_dir}: manifest path {rel!r} escapes the bundle directory")
    if str(pure) != rel:     # "./x", "a//b", "x/": one file, one spelling (paths are compared as written)
        raise BundleError(f"{bundle_dir}: manifest path {rel!r} is not in its plain form {str(pure)!r}")
    return Path(bundle_dir) / pure


def describe_file(bundle_dir: Path, rel: str) -> dict[str, Any]:
    """A `files` record: what the reader will check the file against."""
    path = safe_relative_path(Path(bundle_dir), rel)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def publish(staging: Path, output: Path, overwrite: bool = False) -> None:
    """Move a finished bundle from its staging directory to `output`.

    overwrite: a bundle already there is renamed aside first and removed after, so `output`
    is never a half-written bundle. Without it nothing is ever replaced, also when `output`
    appeared while the bundle was being written (FileExistsError; the rename is atomic)."""
    staging, output = Path(staging), Path(output)
    os.chmod(staging, 0o755)
    if not overwrite:
        try:
            _rename_no_replace(staging, output)
        except FileExistsError:
            raise FileExistsError(f"{output} appeared while this run was writing its bundle; nothing was "
                                  "replaced (pass --overwrite to replace it)") from None
        return
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
        os.replace(staging, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, output)


def _rename_no_replace(source: Path, target: Path) -> None:
    """rename(2) that fails when `target` exists (renameat2 RENAME_NOREPLACE; where the
    kernel or file system lacks it, a check just before a rename, which could only replace
    an empty folder made in between)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, no_replace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(target), no_replace) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, os.strerror(err), str(target))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(target))
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


# -- staging: where a bundle is written before it is published -------------------------
#: staging folders are named ".{output name}.partial-XXXX" beside the output
PARTIAL_MARK = ".partial-"


def is_staging_name(name: str) -> bool:
    return name.startswith(".") and PARTIAL_MARK in name


def lock_if_idle(path: Path) -> Optional[int]:
    """An fd holding `path`'s flock if no process holds it (a stale staging folder), else None."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError:
        os.close(fd)
        return None


class Staging:
    """A hidden folder beside `output` that one run writes a bundle into, held under a flock
    while the run lives: a run killed outright (SIGKILL) leaves the folder unlocked, and the
    next run for the same output removes it (:func:`remove_stale_staging`); read_bundle
    refuses such a folder, so a half-written bundle never loads."""

    def __init__(self, output: Path):
        self.output = Path(output)
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.removed = remove_stale_staging(self.output)
        self.path = Path(tempfile.mkdtemp(prefix=f".{self.output.name}{PARTIAL_MARK}", dir=self.output.parent))
        self._fd = None
        if fcntl is not None:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, kind, value, traceback) -> bool:
        """Leaving with an error (an interrupt included) removes the unfinished bundle."""
        if kind is not None:
            self.discard()
        return False

    def publish(self, overwrite: bool = False) -> Path:
        """Move the bundle to the output (see :func:`publish`); the lock goes with it."""
        try:
            publish(self.path, self.output, overwrite=overwrite)
        except BaseException:
            self.discard()
            raise
        self._release()
        return self.output

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def remove_stale_staging(output: Path) -> int:
    """Remove the staging folders of `output` that no live run holds; returns how many."""
    output = Path(output)
    removed = 0
    try:
        entries = list(output.parent.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.startswith(f".{output.name}{PARTIAL_MARK}") or not entry.is_dir() or entry.is_symlink():
            continue
        fd = lock_if_idle(entry)
        if fd is None:
            continue
        try:
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
        finally:
            os.close(fd)
    if removed:
        log.warning("removed %d unfinished bundle folder(s) of %s left by an interrupted run", removed, output)
    return removed


def read_into_memory(path: Path, size: int, digest):
    """The file's `size` bytes in a new uint8 array, hashed into `digest` (a hashlib object, or
    None) as they are read; a file of another size is refused."""
    import numpy as np
    data = np.empty(size, dtype=np.uint8)
    view = memoryview(data)
    with open(path, "rb", buffering=0) as f:
        filled = 0
        while filled < size:
            n = f.readinto(view[filled:filled + HASH_CHUNK])
            if not n:
                break
            if digest is not None:
                digest.update(view[filled:filled + n])
            filled += n
        longer = bool(f.read(1))
    if filled != size or longer:
        raise BundleError(f"{path}: size differs from the manifest's {size} bytes (truncated or "
                          "altered file)")
    return data

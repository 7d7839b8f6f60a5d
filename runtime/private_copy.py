"""A bundle file's verified bytes in a private, unlinked file, mapped read-only.

Why not anonymous memory: the runtime must use exactly the bytes it hashed (a weights file
changed, truncated or replaced after the check must not reach a loaded guard, and must never
cause a SIGBUS), but an anonymous copy is resident in full for the guard's whole life, even
the embedding rows no text ever gathers, and it cannot be dropped. A private copy that only
this process holds open, written as it is hashed and then mapped, keeps that guarantee: the
file has no name (O_TMPFILE, or unlinked at once), so nothing outside this process can open,
change or truncate it, and the pages a session never reads stay on disk. Resident memory is
what the graphs touch, and the kernel may evict clean pages under pressure and read them back
from the copy. (Processes of the same user can reach any of this process's memory through
/proc or ptrace; that boundary is the operating system's, not the bundle's.)

Where: ``SIREN_WEIGHTS_DIR`` if set, else the temporary directory (``TMPDIR``). A directory on
tmpfs holds the copy in memory (still one copy, but not evictable: point SIREN_WEIGHTS_DIR at a
disk); a directory without room, or one that refuses the file, falls back to an anonymous copy
with a warning.
"""
from __future__ import annotations

import hashlib
import logging
import mmap
import os
import tempfile
import threading
from pathlib import Path
from typing import Optional

import numpy as np

log = logging.getLogger("siren_runtime.bundle")

#: files at least this large are mapped from a private copy; smaller ones are read into memory
MAP_MIN_BYTES = 64 * 1024 * 1024
_CHUNK = 8 * 1024 * 1024
_MEMORY_FILESYSTEMS = {"tmpfs", "ramfs", "hugetlbfs"}


def weights_dir() -> Path:
    return Path(os.environ.get("SIREN_WEIGHTS_DIR") or tempfile.gettempdir())


def filesystem_type(path: Path) -> Optional[str]:
    """The type of the filesystem `path` lives on (longest mount point in /proc/mounts)."""
    try:
        target = str(Path(path).resolve())
        best, kind = "", None
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    point = parts[1].replace("\\040", " ")
                    if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) > len(best):
                        best, kind = point, parts[2]
        return kind
    except OSError:
        return None


def _open_unnamed(directory: Path) -> int:
    """A read-write file with no name in `directory`."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is not None:
        try:
            return os.open(directory, flag | os.O_RDWR, 0o600)
        except OSError:
            pass    # the filesystem has no O_TMPFILE: create and unlink at once
    fd, name = tempfile.mkstemp(prefix=".siren-weights-", dir=directory)
    os.unlink(name)
    return fd


def flip_top_bits(data: np.ndarray, ranges, start: int = 0) -> None:
    """XOR 0x80 into the bytes of `ranges` ((offset, length), sorted) that fall in `data`,
    which holds the file's bytes from `start` on: uint8 code c becomes c - 128 as int8."""
    end = start + len(data)
    for offset, length in ranges:
        if offset >= end:                   # sorted: none further falls in this piece
            break
        lo, hi = max(offset, start), min(offset + length, end)
        if lo < hi:
            piece = data[lo - start:hi - start]
            piece ^= 0x80


def hashed_copy(source: Path, size: int, digest: Optional["hashlib._Hash"],
                flip=()) -> Optional[np.ndarray]:
    """`source`'s first `size` bytes (its whole contents: more or fewer raise ValueError) as
    a read-only uint8 array mapped from a private unnamed copy, hashed into `digest` as they
    are copied. None when no private copy can be made here (the caller reads into memory).
    flip: byte ranges recoded by :func:`flip_top_bits` on their way into the copy, after
    being hashed (recoding the mapped copy afterwards dirtied every page of it a second time:
    measured 929 vs 802 MiB peak at Qwen3-0.6B dims)."""
    directory = weights_dir()
    try:
        free = os.statvfs(directory)
        if free.f_bavail * free.f_frsize < size + (64 << 20):
            log.warning("siren_runtime: %s has no room for a private copy of %s (%.2f GB); holding it in memory "
                        "(set SIREN_WEIGHTS_DIR to a disk with room)", directory, source.name, size / 1e9)
            return None
        fd = _open_unnamed(directory)
    except OSError as e:
        log.warning("siren_runtime: no private copy of %s in %s (%s); holding it in memory", source.name,
                    directory, e)
        return None
    try:
        kind = filesystem_type(directory)
        if kind in _MEMORY_FILESYSTEMS:
            log.info("%s is in memory (%s): the private copy of %s cannot be evicted; set SIREN_WEIGHTS_DIR to "
                     "a disk", directory, kind, source.name)
        buffer = bytearray(_CHUNK)
        view, codes = memoryview(buffer), np.frombuffer(buffer, dtype=np.uint8)
        filled = 0
        with open(source, "rb", buffering=0) as f:
            while filled < size:
                n = f.readinto(view[:min(_CHUNK, size - filled)])
                if not n:
                    break
                if digest is not None:
                    digest.update(view[:n])
                if flip:
                    flip_top_bits(codes[:n], flip, filled)
                written = 0
                while written < n:
                    written += os.write(fd, view[written:n])
                filled += n
            longer = bool(f.read(1))
        if filled != size or longer:
            raise ValueError("size differs")
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) if size else None
    except OSError as e:        # no room after all, an I/O error: nothing mapped yet
        log.warning("siren_runtime: the private copy of %s failed (%s); holding it in memory", source.name, e)
        return None
    finally:
        os.close(fd)            # the mapping keeps the file; no descriptor stays open
    if mapping is None:
        return np.empty(0, dtype=np.uint8)
    return np.frombuffer(mapping, dtype=np.uint8)


def release_pages(array: np.ndarray) -> None:
    """Drop `array`'s resident pages when it is a mapped private copy: a session that holds
    its own form of the weights (pre-packed, or on a GPU) no longer reads them, and a page
    read again later comes back from the copy, unchanged. No-op for anything else."""
    base = _mapping(array)
    if base is not None and hasattr(base, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            base.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


class DroppingPages:
    """While open, drop the resident pages of the given mapped arrays every few milliseconds
    (from a thread): ONNX Runtime reads each weight once while it pre-packs it, and without
    this every page it read would stay resident until the session exists, beside the packed
    copy it made (the weights twice at the peak). A page read again comes back from the
    private copy, unchanged; arrays that are not mapped copies are left alone."""

    INTERVAL_S = 0.005

    def __init__(self, arrays):
        self._arrays = [a for a in arrays if _mapping(a) is not None]
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self) -> "DroppingPages":
        if self._arrays:
            self._thread = threading.Thread(target=self._run, name="siren-drop-pages", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.INTERVAL_S):
            for array in self._arrays:
                release_pages(array)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for array in self._arrays:
            release_pages(array)


def _mapping(array) -> Optional[mmap.mmap]:
    """The mmap an array views (through numpy bases and memoryviews), or None."""
    base = getattr(array, "base", None)
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    return base


def trim_heap() -> None:
    """Give freed heap back to the system (glibc keeps it otherwise: loading a 150k-word
    tokenizer frees ~200 MB of parse buffers that would stay resident)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

"""One number per text for a server whose scores can move with their batch companions.

On GPUs (kernels picked by shape) and with int8 activations (one scale per batch) a text's
score can change by a few ulps with what shares its engine call, so a verdict at a threshold
equal to a score could differ between two routes that asked about the same text. Where the
guard is not batch-invariant (``guard.batch_invariant``), the server remembers the score it
computed for each token sequence (a digest of the ids, a bounded LRU) and every route answers
that number, so /v1/moderations, the classify and detector routes decide alike.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

#: token sequences remembered (32-byte digests: the memo stays small for any max_length)
DEFAULT_ENTRIES = 65536


class ScoreMemo:
    def __init__(self, entries: int = DEFAULT_ENTRIES):
        self._entries = int(entries)
        self._scores: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(ids) -> bytes:
        return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).digest()

    def scores(self, id_lists: list, compute) -> np.ndarray:
        """Each sequence's remembered score, computing (``compute(id_lists) -> scores``) only
        the ones not remembered; the first computed number is the one every later call gets."""
        keys = [self.key(ids) for ids in id_lists]
        out = np.empty(len(id_lists), dtype=np.float32)
        todo = []
        with self._lock:
            for i, key in enumerate(keys):
                known = self._scores.get(key)
                if known is None:
                    todo.append(i)
                else:
                    out[i] = known
                    self._scores.move_to_end(key)
        if todo:
            computed = compute([id_lists[i] for i in todo])
            with self._lock:
                for i, score in zip(todo, computed):
                    out[i] = self._scores.setdefault(keys[i], np.float32(score))   # a racing call's number wins once
                    self._scores.move_to_end(keys[i])
                while len(self._scores) > self._entries:
                    self._scores.popitem(last=False)
        return out

    def __len__(self) -> int:
        return len(self._scores)

"""The runner interface every backend implements."""
from __future__ import annotations

from typing import Protocol

import numpy as np


class Runner(Protocol):
    #: backend name, e.g. "onnxruntime"
    name: str
    #: where it runs, e.g. "cpu" or "cuda"
    device: str

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Scores (float32 [batch]) for padded int64 [batch, seq] inputs."""
        ...

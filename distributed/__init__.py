"""SIREN guards past one machine, on Ray (the `ray` extra; torch-free).

- ``SirenScorer``: a callable class for ``ray.data.Dataset.map_batches`` (one guard per actor).
- ``siren score-corpus``: a corpus of JSON Lines / Parquet scored on Ray Data, exactly once
  per row, resumable (``siren_ray.corpus``).
- ``siren serve-ray``: `siren serve`'s HTTP API on Ray Serve replicas, streams exact on any
  replica (``siren_ray.serve_app``).

Only ``siren_ray.scorer`` is imported here: it needs no Ray, so it also runs on a dict of columns.
"""
from .scorer import NO_ONSET, SirenScorer

__all__ = ["SirenScorer", "NO_ONSET"]

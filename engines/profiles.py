"""Optimization profiles: the shape ranges an engine accepts (and tunes for)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from siren_runtime.bundle import SCORE_IO, STEP_IO, STEP_MIN_PAST
from siren_runtime.validation import check_int


@dataclass(frozen=True)
class Profile:
    """min/opt/max shapes per input name, as TensorRT's IOptimizationProfile wants them."""
    shapes: dict  # name -> {"min": [...], "opt": [...], "max": [...]}

    def to_dict(self) -> dict:
        return asdict(self)


def _check(name: str, value: int, low: int, high: int) -> int:
    return check_int(value, name, low=low, high=high)


def scorer_profiles(max_length: int, max_batch: int = 32, max_seq: int | None = None,
                    opt_batch: int | None = None, opt_seq: int | None = None) -> list[Profile]:
    """Profiles for the full graph: batch 1..max_batch, sequence 1..max_seq (<= max_length).

    Long sequences and short ones tune differently, so when the range is wide a second
    profile covers the short end (the runtime picks the tightest one per batch)."""
    max_seq = _check("max_seq", max_seq if max_seq is not None else max_length, 1, max_length)
    max_batch = _check("max_batch", max_batch, 1, 4096)
    opt_batch = _check("opt_batch", opt_batch if opt_batch is not None else min(8, max_batch), 1, max_batch)
    opt_seq = _check("opt_seq", opt_seq if opt_seq is not None else min(256, max_seq), 1, max_seq)

    def make(seq_max: int, seq_opt: int) -> Profile:
        shape = {"min": [1, 1], "opt": [opt_batch, seq_opt], "max": [max_batch, seq_max]}
        return Profile({name: dict(shape) for name in SCORE_IO.inputs})
    profiles = []
    short = min(128, max_seq)
    if max_seq > 4 * short:
        profiles.append(make(short, min(opt_seq, short)))
    profiles.append(make(max_seq, opt_seq))
    return profiles


def step_profiles(max_length: int, kv_layers: int, kv_heads: int, head_dim: int, features: int,
                  max_new: int | None = None, max_batch: int = 16) -> list[Profile]:
    """One profile for the batched streaming step graph: streams 1..max_batch, past
    1..max_length, new tokens 1..max_new (default max_length: a stream's first feed may
    be a whole prompt, and the runtime steps any feed in one call). The past never has
    length 0 on an engine: TensorRT may clamp an empty minimum to 1, so a batch of first
    feeds carries one zeroed past position that past_lengths (0) masks (STEP_MIN_PAST)."""
    max_new = _check("max_new", max_length if max_new is None else max_new, 1, max_length)
    max_batch = _check("max_batch", max_batch, 1, 4096)
    past_opt = max_length // 2
    ids, new_lengths, past_lengths, past_kv, past_sums = STEP_IO.inputs
    rows = {"min": [1], "opt": [min(4, max_batch)], "max": [max_batch]}
    return [Profile({
        ids: {"min": [1, 1], "opt": [min(4, max_batch), min(8, max_new)], "max": [max_batch, max_new]},
        new_lengths: dict(rows),
        past_lengths: dict(rows),
        past_kv: {"min": [kv_layers, 2, 1, kv_heads, STEP_MIN_PAST, head_dim],
                  "opt": [kv_layers, 2, min(4, max_batch), kv_heads, past_opt, head_dim],
                  "max": [kv_layers, 2, max_batch, kv_heads, max_length, head_dim]},
        past_sums: {"min": [1, features], "opt": [min(4, max_batch), features], "max": [max_batch, features]},
    })]

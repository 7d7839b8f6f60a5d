"""Optimization profiles: the shape ranges an engine accepts (and tunes for)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Profile:
    """min/opt/max shapes per input name, as TensorRT's IOptimizationProfile wants them."""
    shapes: dict  # name -> {"min": [...], "opt": [...], "max": [...]}

    def to_dict(self) -> dict:
        return asdict(self)


def _check(name: str, value: int, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value


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
        return Profile({"input_ids": shape, "attention_mask": dict(shape)})
    profiles = []
    short = min(128, max_seq)
    if max_seq > 4 * short:
        profiles.append(make(short, min(opt_seq, short)))
    profiles.append(make(max_seq, opt_seq))
    return profiles


def step_profiles(max_length: int, kv_layers: int, kv_heads: int, head_dim: int, features: int,
                  max_new: int = 64, max_batch: int = 1) -> list[Profile]:
    """One profile for the streaming step graph: past 0..max_length, new 1..max_new."""
    max_new = _check("max_new", max_new, 1, max_length)
    max_batch = _check("max_batch", max_batch, 1, 4096)
    past_opt = min(max_length // 2, max_length)
    return [Profile({
        "input_ids": {"min": [1, 1], "opt": [1, min(8, max_new)], "max": [max_batch, max_new]},
        "past_kv": {"min": [kv_layers, 2, 1, kv_heads, 0, head_dim],
                    "opt": [kv_layers, 2, 1, kv_heads, past_opt, head_dim],
                    "max": [kv_layers, 2, max_batch, kv_heads, max_length, head_dim]},
        "past_sums": {"min": [1, features], "opt": [1, features], "max": [max_batch, features]},
        "past_count": {"min": [1, 1], "opt": [1, 1], "max": [max_batch, 1]},
    })]

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
        bounds = {"min": dict(batch=1, sequence=1), "opt": dict(batch=opt_batch, sequence=seq_opt),
                  "max": dict(batch=max_batch, sequence=seq_max)}
        return Profile({name: {k: list(SCORE_IO.shape(name, **b)) for k, b in bounds.items()}
                        for name in SCORE_IO.inputs})
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
    sizes = {"kv_layers": kv_layers, "kv_heads": kv_heads, "head_dim": head_dim, "features": features}
    bounds = {"min": dict(batch=1, new=1, past=STEP_MIN_PAST),
              "opt": dict(batch=min(4, max_batch), new=min(8, max_new), past=max_length // 2),
              "max": dict(batch=max_batch, new=max_new, past=max_length)}
    return [Profile({name: {k: list(STEP_IO.shape(name, **sizes, **b)) for k, b in bounds.items()}
                     for name in STEP_IO.inputs})]

"""Bad input gets a clear error and the guard keeps working afterwards."""
from __future__ import annotations

import math

import numpy as np
import pytest

PROBE = "What is the capital of France?"


@pytest.fixture(scope="module")
def baseline(guard):
    return guard.score(PROBE).score


BAD_CALLS = [
    (lambda g: g.score(), ValueError, "Provide"),
    (lambda g: g.score("x", prompt="p"), ValueError, "not both"),
    (lambda g: g.score("x", response="r"), ValueError, "not both"),
    (lambda g: g.score(123), TypeError, "text must be a str"),
    (lambda g: g.score(b"bytes"), TypeError, "text must be a str"),
    (lambda g: g.score(prompt=5), TypeError, "prompt must be a str"),
    (lambda g: g.score(prompt="p", response=["r"]), TypeError, "response must be a str"),
    (lambda g: g.score_batch("a single string"), TypeError, "single str"),
    (lambda g: g.score_batch(["ok", None]), TypeError, r"texts\[1\]"),
    (lambda g: g.score_batch(["ok", 3.5]), TypeError, r"texts\[1\]"),
    (lambda g: g.score_batch(5), TypeError, "list of strings"),
    (lambda g: g.score_streaming(None), TypeError, "response_so_far"),
    (lambda g: g.score("x", threshold=1.5), ValueError, r"\[0, 1\]"),
    (lambda g: g.score("x", threshold=-0.1), ValueError, r"\[0, 1\]"),
    (lambda g: g.score("x", threshold=float("nan")), ValueError, r"\[0, 1\]"),
    (lambda g: g.score("x", threshold=math.inf), ValueError, r"\[0, 1\]"),
    (lambda g: g.score("x", threshold="0.5"), ValueError, "real number"),
    (lambda g: g.score("x", threshold=True), ValueError, "real number"),
    (lambda g: g.score_batch(["x"], threshold=2), ValueError, r"\[0, 1\]"),
    (lambda g: g.score_streaming("x", threshold=np.nan), ValueError, r"\[0, 1\]"),
    (lambda g: g.score("lone \ud800 surrogate"), ValueError, "surrogate"),
    (lambda g: g.score_batch(["fine", "bad \udfff"]), ValueError, r"texts\[1\]"),
]


@pytest.mark.parametrize("call,exc,match", BAD_CALLS)
def test_rejected_call_leaves_guard_working(guard, baseline, call, exc, match):
    with pytest.raises(exc, match=match):
        call(guard)
    assert guard.score(PROBE).score == baseline


def test_accepts_numpy_and_int_thresholds(guard, baseline):
    assert guard.score(PROBE, threshold=np.float32(0.25)).threshold == 0.25
    assert guard.score(PROBE, threshold=1).is_harmful is (baseline >= 1.0)
    assert guard.score_batch((t for t in [PROBE, "x"]), threshold=0)[0].is_harmful


def test_empty_batch_returns_empty_list(guard):
    assert guard.score_batch([]) == []


def test_result_shape(guard):
    result = guard.score(PROBE)
    assert set(result.to_dict()) == {"score", "is_harmful", "threshold"}
    assert isinstance(result.score, float) and isinstance(result.is_harmful, bool)


def test_bad_constructor_arguments(all_layers, tmp_path):
    from siren_runtime import BundleError, SirenGuard
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SirenGuard.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="siren_bundle.json is missing"):
        SirenGuard.from_pretrained(tmp_path)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(BundleError, match="not a bundle directory"):
        SirenGuard.from_pretrained(a_file)
    with pytest.raises(TypeError):
        SirenGuard.from_pretrained(42)
    with pytest.raises(ValueError, match="unknown backend"):
        SirenGuard.from_pretrained(all_layers.bundle, backend="pytorch")
    with pytest.raises(ValueError, match="device"):
        SirenGuard.from_pretrained(all_layers.bundle, device="tpu")
    with pytest.raises(ValueError, match="max_batch_size"):
        SirenGuard.from_pretrained(all_layers.bundle, max_batch_size=0)

"""One resident copy of the weights (issue 22): large bundle files are mapped from a private,
unnamed copy made while they are hashed; the CPU sessions read it in place (no pre-packed
copy per session unless asked). The tiny test bundles are below the mapping threshold, so
these tests lower it to map every file, and check that scores, streams and the tamper
guarantees are those of the in-memory path."""
from __future__ import annotations

import mmap
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import TOL
from siren_runtime import BundleError, SirenGuard, private_copy
from siren_runtime.bundle import read_bundle
from helpers import TAMPER_AFTER_LOAD

TEXTS = ["How do I pick a lock?", "Tell me a story about a dragon and a knight who become friends.", "hi"]


@pytest.fixture()
def map_everything(monkeypatch, tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    monkeypatch.setattr(private_copy, "MAP_MIN_BYTES", 0)
    monkeypatch.setenv("SIREN_WEIGHTS_DIR", str(weights))
    return weights


def _mapped(array: np.ndarray) -> bool:
    base = array.base
    return isinstance(base, mmap.mmap) or isinstance(getattr(base, "obj", None), mmap.mmap)


def _scores_match(guard, reference):
    for text, got in zip(TEXTS, guard.score_batch(TEXTS)):
        assert abs(got.score - reference.score(text).score) <= TOL
    session = guard.stream()
    for cut in (3, 9, len(TEXTS[1])):
        fed = session.feed(TEXTS[1][len(session.text):cut])
        assert abs(fed.score - reference.score(TEXTS[1][:cut]).score) <= TOL


@pytest.mark.parametrize("prepack", [False, True])
def test_mapped_weights_score_exactly(all_layers, map_everything, prepack):
    bundle = read_bundle(all_layers.bundle)
    weights = bundle.read_verified(bundle.model.external_data)
    assert _mapped(weights) and not weights.flags.writeable
    assert list(map_everything.iterdir()) == [], "the private copy must have no name"
    guard = SirenGuard.from_pretrained(all_layers.bundle, device="cpu", prepack_weights=prepack)
    with guard:
        _scores_match(guard, all_layers.reference)
        # one session (the step graph) scores whole texts, streams and prefixes: one copy
        runners = guard.runners
        assert runners.score._step is runners.step and guard.batch_invariant
        assert _mapped(runners.step.buffers[1])
    alone = SirenGuard.from_pretrained(all_layers.bundle, device="cpu", prepack_weights=prepack,
                                       incremental_streaming=False)
    with alone:                     # the scoring graph alone reads the same mapped copy
        _scores_match(alone, all_layers.reference)
        assert alone.runners.step is None and _mapped(alone.runners.score.buffers[1])


def test_release_pages_keeps_the_bytes(all_layers, map_everything):
    bundle = read_bundle(all_layers.bundle)
    weights = bundle.read_verified(bundle.model.external_data)
    before = bytes(weights[:4096]) + bytes(weights[-4096:])
    private_copy.release_pages(weights)
    assert bytes(weights[:4096]) + bytes(weights[-4096:]) == before
    private_copy.release_pages(np.zeros(10, dtype=np.uint8))     # anything else: no-op


def test_altered_file_is_refused_when_mapped(all_layers, map_everything, tmp_path):
    import shutil
    copy = tmp_path / "bundle"
    shutil.copytree(all_layers.bundle, copy)
    data = copy / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="model.onnx.data.*sha256"):
        SirenGuard.from_pretrained(copy, device="cpu")
    with open(data, "r+b") as f:
        f.truncate(len(raw) - 10)
    with pytest.raises(BundleError, match="model.onnx.data.*size"):
        read_bundle(copy).read_verified("model.onnx.data")
    assert list(map_everything.iterdir()) == []


def test_loaded_mapped_guard_is_immune_to_later_file_changes(all_layers, tmp_path):
    """The after-load tamper script of test_bundle (in-place zeros, truncation), on mapped copies."""
    import shutil
    copy = tmp_path / "bundle"
    shutil.copytree(all_layers.bundle, copy)
    script = "import siren_runtime.private_copy as p; p.MAP_MIN_BYTES = 0\n" + TAMPER_AFTER_LOAD
    env = {**os.environ, "SIREN_WEIGHTS_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script, str(copy)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "immune", (proc.returncode, proc.stderr[-2000:])


def test_no_room_for_a_private_copy_falls_back_to_memory(all_layers, monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(private_copy, "MAP_MIN_BYTES", 0)
    monkeypatch.setenv("SIREN_WEIGHTS_DIR", str(tmp_path / "does-not-exist"))
    with caplog.at_level("WARNING", logger="siren_runtime.bundle"):
        bundle = read_bundle(all_layers.bundle)
        weights = bundle.read_verified(bundle.model.external_data)
    assert not _mapped(weights) and "holding it in memory" in caplog.text
    guard = SirenGuard.from_pretrained(all_layers.bundle, device="cpu")
    with guard:
        _scores_match(guard, all_layers.reference)


def test_cpu_batches_are_token_bounded(all_layers):
    guard = SirenGuard.from_pretrained(all_layers.bundle, device="cpu")
    with guard:      # whole texts on the step graph also write their keys and values: half the tokens
        assert guard.runners.score.limits.max_tokens == 256 and guard._token_budget == 256
    alone = SirenGuard.from_pretrained(all_layers.bundle, device="cpu", incremental_streaming=False)
    with alone:
        assert alone.runners.score.limits.max_tokens == 512 and alone._token_budget == 512
    bigger = SirenGuard.from_pretrained(all_layers.bundle, device="cpu", token_budget=4096)
    with bigger:
        assert bigger._token_budget == 4096

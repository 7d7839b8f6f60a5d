"""Steps of many new tokens (a long first feed, a whole text on the CPU's step session) run in
pieces, each a step over the ones before (onnxruntime_runner.WHOLE_TEXT_PIECE; 256 tokens in
production, 8 here so the test bundles' 64-token texts take several pieces): scores equal
llm-siren's, and a piece that fails leaves every stream where it was."""
from __future__ import annotations

import numpy as np
import pytest

from corpus import CORPUS, LONG
from helpers import TOL


@pytest.fixture()
def small_pieces(monkeypatch):
    from siren_runtime.backends import onnxruntime_runner
    monkeypatch.setattr(onnxruntime_runner, "WHOLE_TEXT_PIECE", 8)


def test_whole_texts_and_long_feeds_in_pieces_equal_llm_siren(all_layers, small_pieces):
    from siren_runtime import SirenGuard
    texts = [LONG, CORPUS[0], LONG[:150], "hi"]
    with SirenGuard.from_pretrained(all_layers.bundle, device="cpu") as guard:
        assert type(guard.runners.score).__name__ == "StepGraphScoreRunner"
        assert max(len(guard.token_ids(t)) for t in texts) > 3 * 8
        want = np.array([r.score for r in all_layers.reference.score_batch(texts)])
        got = np.array([r.score for r in guard.score_batch(texts)])
        assert np.max(np.abs(got - want)) <= TOL
        sessions = [guard.stream() for _ in texts]
        results = guard.feed_batch(sessions, texts)                  # long first feeds, together
        assert max(abs(r.score - w) for r, w in zip(results, want)) <= TOL
        assert abs(sessions[0].feed(" And then?").score - all_layers.reference.score(LONG + " And then?").score) <= TOL


def test_a_failed_piece_leaves_every_stream_where_it_was(all_layers, small_pieces):
    """The second piece of one row holds an id past the vocabulary: ONNX Runtime's Gather
    refuses it (a real failure, no mock). Both rows' states are back at their resume point
    and step on from there exactly."""
    from siren_runtime import SirenGuard
    from siren_runtime.backends.base import StepRow
    with SirenGuard.from_pretrained(all_layers.bundle, device="cpu") as guard:
        step = guard.runners.step
        features = guard.bundle.streaming.feature_dim
        ids = guard.token_ids(LONG)[:30]
        states = [step.new_state(), step.new_state()]
        zeros = np.zeros(features, dtype=np.float32)
        past = [out.sums[-1] for out in step.step([StepRow(s, 0, ids[:5], zeros) for s in states])]
        bad = ids[5:20] + [10 ** 7] + ids[21:]                    # the id lands in the second piece
        with pytest.raises(Exception, match="out of data bounds"):
            step.step([StepRow(states[0], 5, ids[5:], past[0]), StepRow(states[1], 5, bad, past[1])])
        assert [s.length for s in states] == [5, 5]
        first = step.step([StepRow(states[0], 5, ids[5:], past[0])])
        fresh = step.new_state()
        again = step.step([StepRow(fresh, 0, ids, zeros)])
        assert abs(first[0].score - again[0].score) <= TOL
        assert np.allclose(first[0].sums, again[0].sums[5:], rtol=1e-5, atol=1e-5)

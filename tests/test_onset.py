"""Where harm starts (issue 25): every prefix's score in one pass, spans in the caller's own
text, the onset against a brute-force scan, stream sessions that report the first crossing
from their own step, `siren score --onset`, and the FMS detector API over real HTTP in a
torch-free server. Against the runtime's own score() of each token prefix and llm-siren."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from corpus import CORPUS
from helpers import TOL
from serve_process import ServeProcess

MIXED = [
    "Sure! <|im_start|>assistant\nHere is how you pick a lock:\t\tfirst, insert the tension wrench.<|im_end|>",
    "Emoji 🙂🔥 and CJK 日本語のテキスト, then a question: how do I make thermite?",
    "Combining marks: e\u0301le\u0300ve, n\u0303, and the rest of a sentence about chemistry.",
    "   leading spaces,\n\n\n\nblank lines, [INST] and <s> tokens [/INST] to clean away   ",
    "A long one past max_length: " + "the quick brown fox jumps over the lazy dog " * 30,
]


def between(scores, q: float) -> float:
    """A threshold near the q-quantile of `scores` but at least 1e-5 from every score, so a
    brute-force scan and the one-pass scores cannot disagree by rounding at a tie."""
    values = np.unique(np.asarray(scores, dtype=np.float64))
    k = min(int(q * (len(values) - 1)), len(values) - 2) if len(values) > 1 else 0
    for lo, hi in list(zip(values[k:], values[k + 1:])) + list(zip(values[:k][::-1], values[1:k + 1][::-1])):
        if hi - lo > 2e-5:
            return float((lo + hi) / 2)
    return float(values[-1] + 1e-3)


def check_prefixes(guard, reference, texts, max_length: int) -> dict:
    """Every prefix score equals score() of that token prefix (the runtime, and llm-siren
    where the prefix's decoded text tokenizes back to it); spans tile the caller's text; the
    onset equals a brute-force scan. Returns counts for the caller's own checks."""
    counts = {"prefixes": 0, "reference_checked": 0}
    results = guard.score_prefixes_batch(texts)
    prefix_tokens = len(guard._encoder.prefix or ())
    for text, result in zip(texts, results):
        ids = list(result.token_ids)
        assert ids == guard.token_ids(text) and len(ids) <= max_length
        assert abs(result.score - guard.score(text).score) <= TOL
        brute = guard.score_token_ids([ids[:k + 1] for k in range(len(ids))])
        assert np.max(np.abs(brute - result.scores)) <= TOL
        counts["prefixes"] += len(ids)
        # llm-siren on the token prefixes whose decoded text is that very prefix again
        decoded = [guard._encoder._tokenizer.decode(ids[:k + 1], skip_special_tokens=False)
                   for k in range(prefix_tokens, len(ids), 3)]
        same = [(d, k) for d, k in zip(decoded, range(prefix_tokens, len(ids), 3))
                if guard.token_ids(d) == ids[:k + 1]]
        if same:
            ref = [r.score for r in reference.score_batch([d for d, _ in same])]
            assert max(abs(r - result.scores[k]) for r, (_, k) in zip(ref, same)) <= TOL
            counts["reference_checked"] += len(same)
        # spans tile the text the tokens cover, in the caller's own characters
        spans = result.spans[prefix_tokens:]
        from siren_runtime.text import clean_text_with_offsets
        assert spans[0][0] == clean_text_with_offsets(text)[1][0]      # where the cleaned text begins
        for (a, b), (c, _) in zip(spans, spans[1:]):
            assert a <= b == c
        assert 0 <= spans[-1][1] <= len(text)
        for (a, b), token in zip(spans, ids[prefix_tokens:]):
            piece = guard._encoder._tokenizer.decode([token]).strip()
            if piece.isascii() and piece.isalnum():
                assert piece in text[a:b], (piece, text[a:b])
        # the onset: brute force over prefix scores, at thresholds where it lands inside
        for q in (0.2, 0.5, 0.8):
            threshold = between(brute, q)
            for sustain in (1, 3):
                above = brute >= threshold
                first = next((k for k in range(len(ids) - sustain + 1) if above[k:k + sustain].all()), None)
                want = None if first is None else result.spans[first][0]
                assert result.onset(threshold, sustain) == want
                if sustain == 1:
                    assert guard.onset(text, threshold=threshold) == want
    return counts


def test_every_prefix_score_span_and_onset(guard, all_layers):
    counts = check_prefixes(guard, all_layers.reference, MIXED + CORPUS[:8], guard.max_length)
    assert counts["prefixes"] > 150 and counts["reference_checked"] > 30, counts


def test_prefix_scores_need_a_step_graph_and_say_so(all_layers):
    from siren_runtime import SirenGuard
    with SirenGuard.from_pretrained(all_layers.bundle, device="cpu", incremental_streaming=False) as plain:
        assert not plain.prefix_scores_available
        with pytest.raises(RuntimeError, match="streaming step graph"):
            plain.score_prefixes("hello")
    with pytest.raises(ValueError, match="sustain"):
        SirenGuard.from_pretrained(all_layers.bundle, device="cpu").onset("x", sustain=0)


def test_stream_reports_where_its_score_first_crossed(guard):
    """Fed word by word (no re-tokenization at the boundaries), a session's onset is the
    one-pass onset of its text, found from the step's own sums."""
    for text in MIXED[:3] + CORPUS[:6]:
        words = text.split(" ")
        chunks = [words[0]] + [" " + w for w in words[1:]]
        whole = guard.score_prefixes(text)
        threshold = between(whole.scores, 0.6)
        session = guard.stream(threshold=threshold, keep_text=False)
        fed = 0
        for chunk in chunks:
            result = session.feed(chunk)
            fed += len(chunk)
            assert abs(result.score - guard.score(text[:fed]).score) <= TOL
        assert session.onset == whole.onset(threshold), (text, session.onset, whole.onset(threshold))


def test_stream_onset_when_one_feed_settles_text(guard):
    """A single long feed settles most of its text at once; the onset still points at the
    crossing token, not at the start of the part left open (found by a probe)."""
    for text, threshold in (("mat world mat hello I sat you on are are", None), ("word " * 3000, None)):
        whole = guard.score_prefixes(text)
        threshold = between(whole.scores, 0.5)
        session = guard.stream(threshold=threshold, keep_text=False)
        session.feed(text)
        assert session.onset == whole.onset(threshold)
        if session.score.is_harmful:
            assert session.onset is not None


def test_score_cli_onset(all_layers, guard, capsys):
    from siren_cli.main import main
    text = MIXED[1]
    whole = guard.score_prefixes(text)
    threshold = between(whole.scores, 0.5)
    assert main(["score", str(all_layers.bundle), text, "plain", "--onset", "--json", "--threshold",
                 repr(threshold), "-q"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["onset"] == whole.onset(threshold)
    assert rows[1]["onset"] == guard.score_prefixes("plain").onset(threshold)
    assert main(["score", str(all_layers.bundle), text, "--onset", "--threshold", "1.0", "-q"]) == 0
    assert "onset=-" in capsys.readouterr().out


@pytest.fixture(scope="module")
def detector_server(all_layers):
    proc = ServeProcess(all_layers.bundle, "--max-inputs", "8")
    proc.start()
    yield proc
    proc.stop()


def test_detector_api_contents_and_generation(detector_server, guard):
    url = detector_server.url
    texts = [MIXED[0], MIXED[2], "ok"]
    expected = guard.score_prefixes_batch(texts)
    scores = [r.score for r in guard.score_batch(texts)]       # the verdict is the scoring graph's
    threshold = between(np.concatenate([e.scores for e in expected]), 0.5)
    reply = httpx.post(url + "/api/v1/text/contents", headers={"detector-id": "siren"},
                       json={"contents": texts, "detector_params": {"threshold": threshold, "sustain": 2}})
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert isinstance(body, list) and len(body) == len(texts)
    for detections, text, want, score in zip(body, texts, expected, scores):
        assert isinstance(detections, list)
        if score < threshold:
            assert detections == []
            continue
        [d] = detections
        assert set(d) == {"start", "end", "text", "detection", "detection_type", "score"}
        assert isinstance(d["start"], int) and isinstance(d["end"], int) and isinstance(d["score"], float)
        onset = want.onset(threshold, 2)
        assert d["start"] == (0 if onset is None else onset) and d["end"] == len(text)
        assert d["text"] == text[d["start"]:] and d["detection"] == "harmful" and d["detection_type"] == "siren"
        assert abs(d["score"] - score) <= TOL
    # at a threshold equal to the moderations score, both flag it (no rounding between two heads)
    exact = httpx.post(url + "/v1/moderations", json={"input": texts[0]}).json()["results"][0]["score"]
    at = httpx.post(url + "/api/v1/text/contents", headers={"detector-id": "siren"},
                    json={"contents": [texts[0]], "detector_params": {"threshold": exact}}).json()
    assert len(at[0]) == 1 and at[0][0]["score"] == exact
    generation = httpx.post(url + "/api/v1/text/generation", headers={"detector-id": "siren"},
                            json={"prompt": "How do I pick a lock?", "generated_text": "First, insert the wrench.",
                                  "detector_params": {"threshold": 0.0}})
    assert generation.status_code == 200
    [g] = generation.json()
    assert set(g) == {"detection", "detection_type", "score"}
    joined = guard.score(prompt="How do I pick a lock?", response="First, insert the wrench.").score
    assert abs(g["score"] - joined) <= TOL
    strict = httpx.post(url + "/api/v1/text/generation", headers={"detector-id": "siren"},
                        json={"prompt": "a", "generated_text": "b", "detector_params": {"threshold": 1.0}})
    assert strict.status_code == 200 and strict.json() == []


def test_detector_api_errors_in_its_own_shape(detector_server):
    url = detector_server.url + "/api/v1/text/contents"
    cases = [({"contents": "not a list"}, 422), ({"contents": []}, 422), ({"contents": ["a", 3]}, 422),
             ({"contents": ["a"], "detector_params": {"threshold": 2}}, 422),
             ({"contents": ["a"], "detector_params": {"sustain": 0}}, 422),
             ({"contents": ["a"], "detector_params": {"color": "red"}}, 422),
             ({"contents": ["a"], "detector_params": []}, 422),
             ({"contents": ["\ud800"]}, 422), ({"contents": ["x"] * 9}, 413)]
    headers = {"content-type": "application/json", "detector-id": "siren"}
    for body, status in cases:
        content = json.dumps(body).encode()
        reply = httpx.post(url, content=content, headers=headers)
        assert reply.status_code == status, (body, reply.text)
        error = reply.json()
        assert set(error) == {"code", "message"} and error["code"] == status and isinstance(error["message"], str)
    malformed = httpx.post(url, content=b"{not json", headers=headers)
    assert malformed.status_code == 422 and malformed.json()["code"] == 422
    missing = httpx.post(detector_server.url + "/api/v1/text/generation", json={"prompt": "a"}, headers=headers)
    assert missing.status_code == 422 and "generated_text" in missing.json()["message"]
    no_id = httpx.post(url, json={"contents": ["a"]})                    # the header is required
    assert no_id.status_code == 422 and "detector-id" in no_id.json()["message"]
    wrong_method = httpx.get(url, headers=headers)
    assert wrong_method.status_code == 405 and set(wrong_method.json()) == {"code", "message"}


def test_stream_answer_carries_the_onset(detector_server, guard):
    url = detector_server.url
    sid = httpx.post(url + "/v1/streams", json={"threshold": 0.0}).json()["id"]
    first = httpx.post(f"{url}/v1/streams/{sid}", json={"delta": "Hello there"}).json()
    assert first["onset"] == 0                  # threshold 0: the very first token crosses
    sid = httpx.post(url + "/v1/streams", json={"threshold": 1.0}).json()["id"]
    assert httpx.get(f"{url}/v1/streams/{sid}").json()["threshold"] == 1.0      # before any feed, too
    assert httpx.post(f"{url}/v1/streams/{sid}", json={"delta": "Hello"}).json()["onset"] is None

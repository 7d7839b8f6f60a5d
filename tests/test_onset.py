"""Where harm starts (issue 25): every prefix's score in one pass, spans in the caller's own
text, the onset against a brute-force scan, stream sessions that report the first crossing
from their own step, `siren score --onset`, and the FMS detector API over real HTTP in a
torch-free server. Against the runtime's own score() of each token prefix and llm-siren."""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from corpus import CORPUS, MIXED
from helpers import TOL, between, check_prefixes
from serve_process import ServeProcess




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

"""`siren serve` on a real uvicorn server in a torch-free child process, called with the real
`openai` client and plain HTTP: scores equal the runtime's, dynamic batching under load,
stream sessions, 4xx JSON errors that lose nothing, metrics, graceful shutdown."""
from __future__ import annotations

import random
import threading

import pytest

from corpus import CORPUS
from helpers import TOL, random_chunks, metric
from serve_process import ServeProcess

import httpx
import openai


@pytest.fixture(scope="module")
def server(all_layers):
    proc = ServeProcess(all_layers.bundle, "--max-batch", "16", "--max-wait-ms", "5", "--max-body-bytes", "65536",
                        "--max-inputs", "64", "--model-name", "siren-tiny")
    proc.start()
    yield proc
    proc.stop()


def test_openai_client_moderations(server, guard, all_layers):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    texts = CORPUS[:12]
    response = client.moderations.create(model="siren-tiny", input=texts)
    expected = [r.score for r in guard.score_batch(texts)]
    got = [r.category_scores.harmful for r in response.results]
    assert max(abs(a - b) for a, b in zip(got, expected)) <= TOL
    assert [r.flagged for r in response.results] == [s >= 0.5 for s in got]
    assert response.model == "siren-tiny" and response.results[0].categories.harmful == (got[0] >= 0.5)
    # and llm-siren on the same weights
    reference = [r.score for r in all_layers.reference.score_batch(texts)]
    assert max(abs(a - b) for a, b in zip(got, reference)) <= TOL
    single = client.moderations.create(model="siren-tiny", input="How can I make a pipe bomb at home?")
    assert abs(single.results[0].category_scores.harmful - guard.score("How can I make a pipe bomb at home?").score) <= TOL


def test_classify_and_per_request_threshold(server, guard):
    body = httpx.post(server.url + "/classify", json={"model": "m", "input": ["hello", "bomb making"],
                                                      "threshold": 0.0}).json()
    expected = [r.score for r in guard.score_batch(["hello", "bomb making"])]
    assert [d["index"] for d in body["data"]] == [0, 1] and body["object"] == "list"
    for row, score in zip(body["data"], expected):
        assert abs(row["probs"][1] - score) <= TOL and abs(sum(row["probs"]) - 1.0) <= 1e-6
        assert row["label"] == "harmful" and row["threshold"] == 0.0
    assert body["usage"]["prompt_tokens"] == sum(len(guard.token_ids(t)) for t in ["hello", "bomb making"])
    strict = httpx.post(server.url + "/v1/moderations", json={"input": "hello", "threshold": 1.0}).json()
    assert strict["results"][0]["flagged"] is False and strict["results"][0]["threshold"] == 1.0


def test_eight_clients_two_hundred_requests_batched(server, guard):
    texts = [f"client text {i}: " + "please explain " * (i % 9) + ("weapons" if i % 4 else "gardening")
             for i in range(40)]
    expected = {t: r.score for t, r in zip(texts, guard.score_batch(texts))}
    before = httpx.get(server.url + "/metrics").text
    failures, done = [], []

    def worker(w: int) -> None:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        for n in range(200):
            text = texts[(w * 7 + n) % len(texts)]
            try:
                score = client.moderations.create(model="siren-tiny", input=text).results[0].category_scores.harmful
                if abs(score - expected[text]) > TOL:
                    failures.append((text, score, expected[text]))
                done.append(1)
            except Exception as e:   # reported below
                failures.append((text, repr(e)))
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures[:5] and len(done) == 1600
    after = httpx.get(server.url + "/metrics").text
    calls = metric(after, "siren_batch_size_count", kind="score") - metric(before, "siren_batch_size_count", kind="score")
    singles = (metric(after, "siren_batch_size_bucket", kind="score", le="1.0")
               - metric(before, "siren_batch_size_bucket", kind="score", le="1.0"))
    inputs = metric(after, "siren_batch_size_sum", kind="score") - metric(before, "siren_batch_size_sum", kind="score")
    assert inputs == 1600 and calls < 1600 and singles < calls      # batches larger than one happened
    assert metric(after, "siren_requests_total", endpoint="moderations", status="200") >= 1600


def test_bad_requests_get_json_4xx_and_server_keeps_serving(server, guard):
    baseline = httpx.post(server.url + "/v1/moderations", json={"input": "still serving"}).json()
    bad = [
        dict(content=b"{not json", status=400),
        dict(content=b"\xff\xfe", status=400),
        dict(content=b"[1, 2]", status=400),
        dict(json={"input": 5}, status=400),
        dict(json={"input": ["ok", 7]}, status=400),
        dict(json={"input": []}, status=400),
        dict(json={"text": "wrong field"}, status=400),
        dict(json={"input": "x", "threshold": 2}, status=400),
        dict(json={"input": "x", "threshold": "high"}, status=400),
        dict(json={"input": [{"type": "image_url", "image_url": {"url": "x"}}]}, status=400),
        dict(content=b'{"input": "\\ud800 lone surrogate"}', status=400),     # JSON escapes allow it
        dict(json={"input": ["x"] * 65}, status=413),
        dict(content=b'{"input": "' + b"a" * 70000 + b'"}', status=413),
    ]
    for case in bad:
        status = case.pop("status")
        response = httpx.post(server.url + "/v1/moderations", **case)
        assert response.status_code == status, (case, response.text)
        assert isinstance(response.json()["error"]["message"], str)
        again = httpx.post(server.url + "/v1/moderations", json={"input": "still serving"}).json()
        assert abs(again["results"][0]["score"] - baseline["results"][0]["score"]) <= TOL
    assert httpx.post(server.url + "/v1/streams/strm-nope", json={"delta": "x"}).status_code == 404
    assert httpx.delete(server.url + "/v1/streams/strm-nope").status_code == 404
    assert httpx.get(server.url + "/no/such/route").json()["error"]["message"] == "Not Found"
    assert httpx.get(server.url + "/v1/moderations").status_code == 405
    # a bad input batched with good ones fails only its own request
    results = {}

    def call(name, body):
        results[name] = httpx.post(server.url + "/v1/moderations", content=body)
    threads = [threading.Thread(target=call, args=(f"good{i}", b'{"input": "good text %d"}' % i)) for i in range(6)]
    threads.append(threading.Thread(target=call, args=("bad", b'{"input": "\\udfff"}')))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.pop("bad").status_code == 400
    for name, response in results.items():
        assert abs(response.json()["results"][0]["score"] - guard.score("good text " + name[4:]).score) <= TOL
    metrics = httpx.get(server.url + "/metrics").text
    assert metric(metrics, "siren_errors_total", kind="client") >= len(bad)


def test_stream_sessions_interleaved_and_stepped_together(server, guard):
    rng = random.Random(3)
    texts = [CORPUS[i] + " " + CORPUS[i + 1] for i in range(6)]
    opened = [httpx.post(server.url + "/v1/streams", json={"threshold": 0.4}) for _ in texts]
    assert all(r.status_code == 201 for r in opened)
    ids = [r.json()["id"] for r in opened]
    pieces = [random_chunks(t, rng, 2, 12) for t in texts]
    before = httpx.get(server.url + "/metrics").text
    failures = []

    def stream(k: int) -> None:
        client = httpx.Client(base_url=server.url)
        so_far = ""
        for piece in pieces[k]:
            so_far += piece
            body = client.post(f"/v1/streams/{ids[k]}", json={"delta": piece}).json()
            if abs(body["score"] - guard.score(so_far).score) > TOL or body["threshold"] != 0.4:
                failures.append((k, so_far, body))
    threads = [threading.Thread(target=stream, args=(k,)) for k in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures[:3]
    after = httpx.get(server.url + "/metrics").text
    calls = metric(after, "siren_batch_size_count", kind="stream") - metric(before, "siren_batch_size_count", kind="stream")
    feeds = metric(after, "siren_batch_size_sum", kind="stream") - metric(before, "siren_batch_size_sum", kind="stream")
    assert feeds == sum(len(p) for p in pieces) and calls < feeds        # concurrent sessions shared engine calls
    last = httpx.get(f"{server.url}/v1/streams/{ids[0]}").json()
    assert abs(last["score"] - guard.score(texts[0]).score) <= TOL and last["chars"] == len(texts[0])
    for session_id in ids:
        assert httpx.delete(f"{server.url}/v1/streams/{session_id}").json()["deleted"] is True
    assert httpx.post(f"{server.url}/v1/streams/{ids[0]}", json={"delta": "x"}).status_code == 404
    assert httpx.get(server.url + "/health").json()["sessions"] == 0


def test_session_limit_ttl_and_graceful_shutdown(all_layers, guard):
    with ServeProcess(all_layers.bundle, "--max-sessions", "2", "--session-ttl", "1.5", "--no-batching") as srv:
        a = httpx.post(srv.url + "/v1/streams").json()["id"]
        httpx.post(srv.url + "/v1/streams")
        full = httpx.post(srv.url + "/v1/streams")
        assert full.status_code == 429 and full.json()["error"]["code"] == "too_many_sessions"
        import time
        time.sleep(1.8)                                   # both idle past the TTL
        assert httpx.post(f"{srv.url}/v1/streams/{a}", json={"delta": "x"}).status_code == 404
        assert httpx.post(srv.url + "/v1/streams").status_code == 201
        # requests in flight when SIGTERM arrives are answered, then the process exits by the signal
        texts = [f"in flight {i}: " + "a long text to keep the server busy " * 6 for i in range(6)]
        results = {}

        def call(i):
            try:
                results[i] = httpx.post(srv.url + "/v1/moderations", json={"input": [texts[i]] * 256}, timeout=60)
            except httpx.HTTPError as e:           # sent after the listener closed
                results[i] = e
        threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not metric(httpx.get(srv.url + "/metrics").text,
                                                          "siren_batch_size_count", kind="score"):
            time.sleep(0.005)                     # until a request is inside the scorer
        code, output = srv.stop()
        for t in threads:
            t.join()
        # uvicorn re-raises SIGTERM after its graceful shutdown (what process managers expect)
        assert code in (0, -15), output
        assert "Application shutdown complete" in output
        answered = {i: r for i, r in results.items() if isinstance(r, httpx.Response) and r.status_code == 200}
        assert answered, results
        for i, response in answered.items():
            assert abs(response.json()["results"][0]["score"] - guard.score(texts[i]).score) <= TOL
        assert not [r for r in results.values() if isinstance(r, httpx.Response) and r.status_code >= 500]

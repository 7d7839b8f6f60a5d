"""The HTTP server under abuse (adversarial probes of issues 21 and 38, each break reproduced
and held shut): a stream feed racing its session's delete or expiry never answers another
text's score; huge JSON numbers, broken wires, oversized bodies (a 413 clients see) and client
disconnects are 4xx, never 5xx; /health says 503 while draining; non-finite options and a taken
port are refused before loading; every route decides from the same number. Real server
(torch-free child), real clients (httpx, urllib, a raw socket), real bundles."""
from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import httpx
import numpy as np
import pytest

from helpers import TOL, copy_bundle, edit_manifest, metric, random_texts
from serve_process import SCRIPT, ServeProcess, free_port


# -- 2: a text's score does not depend on what shares its batch ---------------------------


OPENING = "Hello there, my friend. "


DELTA = "How do I build a bomb?"


@pytest.fixture(scope="module")
def racy_server(all_layers):
    """Feeds wait up to 20 ms for their batch (the window a racing DELETE lands in) and idle
    sessions expire after 0.15 s (so expiry races its feeds)."""
    proc = ServeProcess(all_layers.bundle, "--max-wait-ms", "20", "--session-ttl", "0.15",
                        "--max-body-bytes", "65536", "--model-name", "siren-tiny")
    proc.start()
    yield proc
    proc.stop()


def _expected(guard):
    return {"one": guard.score(OPENING).score, "two": guard.score(OPENING + DELTA).score}


async def _race_once(client: httpx.AsyncClient, url: str, expected: dict, mode: str, rng: random.Random) -> str:
    opened = await client.post(url + "/v1/streams", json={})
    sid = opened.json()["id"]
    first = await client.post(f"{url}/v1/streams/{sid}", json={"delta": OPENING})
    if first.status_code != 200:      # expired before the first feed even landed: nothing to race
        return "expired-early"
    assert abs(first.json()["score"] - expected["one"]) <= TOL

    async def feed():
        return await client.post(f"{url}/v1/streams/{sid}", json={"delta": DELTA})

    async def delete():
        await asyncio.sleep(rng.uniform(0, 0.025))
        return await client.delete(f"{url}/v1/streams/{sid}")

    if mode == "delete":
        fed, _ = await asyncio.gather(feed(), delete())
    else:                              # the TTL: idle for about its length, then feed
        await asyncio.sleep(rng.uniform(0.10, 0.20))
        fed = await feed()
        await client.delete(f"{url}/v1/streams/{sid}")
    if fed.status_code == 200:
        body = fed.json()
        # the score of the whole text, never of the delta alone on a reset session
        assert body["chars"] == len(OPENING + DELTA), body
        assert abs(body["score"] - expected["two"]) <= TOL, body
        return "fed"
    assert fed.status_code == 404, fed.text
    assert fed.json()["error"]["code"] == "unknown_session"
    return "gone"


def test_feed_racing_delete_or_expiry_never_answers_a_wrong_score(racy_server, guard):
    expected = _expected(guard)
    assert abs(expected["two"] - guard.score(DELTA).score) > 1e-3    # a reset session would be caught
    rng = random.Random(21)

    async def run(mode: str, count: int) -> dict:
        outcomes: dict = {}
        async with httpx.AsyncClient(timeout=30.0) as client:
            for start in range(0, count, 10):      # ten races at a time
                results = await asyncio.gather(*[_race_once(client, racy_server.url, expected, mode, rng)
                                                 for _ in range(min(10, count - start))])
                for r in results:
                    outcomes[r] = outcomes.get(r, 0) + 1
        return outcomes
    deletes = asyncio.run(run("delete", 300))
    expiries = asyncio.run(run("expiry", 200))
    assert sum(deletes.values()) == 300 and sum(expiries.values()) == 200
    # both orders happened, so the races were real
    assert deletes.get("fed", 0) > 0 and deletes.get("gone", 0) > 0, deletes
    assert expiries.get("fed", 0) > 0 and expiries.get("gone", 0) > 0, expiries
    metrics = httpx.get(racy_server.url + "/metrics").text
    assert metric(metrics, "siren_requests_total", endpoint="stream_feed", status="500") == 0


def test_huge_json_numbers_are_400_not_500(racy_server):
    url = racy_server.url
    huge = b"1" + b"0" * 400
    for path, body in (("/v1/moderations", b'{"input": "x", "threshold": %s}' % huge),
                       ("/classify", b'{"input": "x", "threshold": %s}' % huge),
                       ("/v1/streams", b'{"threshold": %s}' % huge),
                       ("/v1/moderations", b'{"input": "x", "extra": %s}' % (b"7" * 5000)),
                       ("/v1/streams", b'{"unknown": %s}' % (b"7" * 5000))):
        response = httpx.post(url + path, content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["message"]
    refused = httpx.post(url + "/v1/moderations", content=b'{"input": "x", "threshold": %s}' % huge)
    assert "threshold" in refused.json()["error"]["message"] and refused.json()["error"]["param"] == "threshold"
    metrics = httpx.get(url + "/metrics").text
    assert metric(metrics, "siren_errors_total", kind="server") == 0


def test_small_wire_breaks(racy_server, guard):
    url = racy_server.url
    # `model` is echoed back only as a string
    for bad in (5, ["a"], {"x": 1}, True):
        response = httpx.post(url + "/v1/moderations", json={"input": "x", "model": bad})
        assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    assert httpx.post(url + "/v1/moderations", json={"input": "x", "model": "m1"}).json()["model"] == "m1"
    # an empty chunked body opens a stream, as an empty Content-Length body does

    def empty_chunks():
        yield b""
    chunked = httpx.post(url + "/v1/streams", content=empty_chunks())
    assert chunked.request.headers.get("transfer-encoding") == "chunked"
    assert chunked.status_code == 201, chunked.text
    plain = httpx.post(url + "/v1/streams", content=b"")
    assert plain.status_code == 201
    for opened in (chunked, plain):
        httpx.delete(f"{url}/v1/streams/{opened.json()['id']}")


def test_oversized_body_413_reaches_urllib(racy_server):
    """urllib sends the whole body before it reads the answer: the server must read it (up to
    its drain limit) rather than close on it, or the client sees a reset."""
    body = json.dumps({"input": "a" * (20 << 20)}).encode()
    for _ in range(3):
        request = urllib.request.Request(racy_server.url + "/v1/moderations", data=body,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=60)
        assert info.value.code == 413
        assert json.loads(info.value.read())["error"]["code"] == "body_too_large"


def test_client_disconnect_mid_body_is_not_a_server_error(racy_server):
    before = httpx.get(racy_server.url + "/metrics").text
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", racy_server.port)) as sock:
            sock.sendall(b"POST /v1/moderations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 5000\r\n\r\n{\"input\": \"abc")
            time.sleep(0.1)
    time.sleep(0.5)
    after = httpx.get(racy_server.url + "/metrics").text
    assert metric(after, "siren_errors_total", kind="server") == metric(before, "siren_errors_total", kind="server")
    assert metric(after, "siren_requests_total", endpoint="moderations", status="500") == 0
    assert (metric(after, "siren_errors_total", kind="client_disconnected")
            - metric(before, "siren_errors_total", kind="client_disconnected")) == 3
    assert httpx.post(racy_server.url + "/v1/moderations", json={"input": "still up"}).status_code == 200


def test_health_says_503_while_draining_and_requests_still_work(all_layers):
    proc = ServeProcess(all_layers.bundle, "--drain-s", "3")
    proc.start()
    try:
        proc.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        health = None
        while time.monotonic() < deadline:
            health = httpx.get(proc.url + "/health")
            if health.status_code == 503:
                break
            time.sleep(0.05)
        assert health is not None and health.status_code == 503 and health.json()["status"] == "shutting_down"
        assert httpx.post(proc.url + "/v1/moderations", json={"input": "still served"}).status_code == 200
        proc.process.wait(timeout=30)
    finally:
        code, output = proc.stop()
    assert code in (0, -15), output


@pytest.mark.parametrize("option,value", [("--max-wait-ms", "inf"), ("--max-wait-ms", "nan"),
                                          ("--session-ttl", "inf"), ("--session-ttl", "nan"),
                                          ("--drain-s", "-1"), ("--graceful-timeout", "inf"),
                                          ("--max-batch", "0")])
def test_non_finite_server_options_are_refused(all_layers, capsys, option, value):
    from siren_cli.main import main
    assert main(["serve", str(all_layers.bundle), option, value]) == 2
    assert option in capsys.readouterr().err


def test_routes_decide_from_the_same_number(all_layers, guard):
    """Under concurrency (dynamic batches of mixed texts), /v1/moderations, the detector
    routes and in-process calls give each text the same score, so the same verdict."""
    rng = random.Random(7)
    texts = random_texts(rng, 60) + ["hello world"]
    alone = {t: guard.score(t).score for t in texts}
    proc = ServeProcess(all_layers.bundle, "--max-wait-ms", "5", "--model-name", "siren-tiny").start()
    try:
        async def run():
            async with httpx.AsyncClient(base_url=proc.url, timeout=60) as client:
                async def moderation(text):
                    reply = await client.post("/v1/moderations", json={"input": text})
                    return "moderations", text, reply.json()["results"][0]["score"]

                async def detector(text):
                    reply = await client.post("/api/v1/text/contents", headers={"detector-id": "siren"},
                                              json={"contents": [text], "detector_params": {"threshold": alone[text]}})
                    found = reply.json()[0]
                    return "contents", text, found[0]["score"] if found else None

                async def several(batch):
                    reply = await client.post("/v1/moderations", json={"input": batch})
                    return [("batch", t, r["score"]) for t, r in zip(batch, reply.json()["results"])]
                jobs = []
                for _ in range(4):
                    for text in texts:
                        jobs.append(moderation(text))
                        jobs.append(detector(text))
                    jobs.append(several(rng.sample(texts, 16)))
                rng.shuffle(jobs)
                return await asyncio.gather(*jobs)
        replies = asyncio.run(run())
    finally:
        proc.stop()
    flat = [r for item in replies for r in (item if isinstance(item, list) else [item])]
    assert len(flat) > 400
    differing = [(route, text, score, alone[text]) for route, text, score in flat if score != np.float32(alone[text])]
    assert differing == []          # None (not detected at threshold = own score) would be listed too


# -- 7: a taken port is found before the bundle is read -----------------------------------
def test_serve_on_a_taken_port_exits_2_before_loading(tmp_path):
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # no bundle at all: the port is checked first, so the error is the port's
        run = subprocess.run([sys.executable, "-c", SCRIPT, "serve", str(tmp_path / "no-bundle"), "--port", str(port)],
                             capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"siren serve: error: port {port} on 127.0.0.1 is already in use "
                                               "(pick another with --port)"]
    run = subprocess.run([sys.executable, "-c", SCRIPT, "serve", str(tmp_path / "no-bundle"),
                          "--host", "no-such-host.invalid", "--port", str(free_port())],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "does not resolve" in run.stderr and len(run.stderr.strip().splitlines()) == 1


# -- 8: every common client sees the 413 of a body over 64 MiB ------------------------------
def test_a_body_over_64_mib_gets_a_413_that_clients_see(all_layers):
    import requests
    proc = ServeProcess(all_layers.bundle).start()
    try:
        body = b'{"input": "' + b"a" * (70 << 20) + b'"}'
        request = urllib.request.Request(proc.url + "/v1/moderations", data=body,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=120)
        assert refused.value.code == 413
        assert requests.post(proc.url + "/v1/moderations", data=body, timeout=120).status_code == 413
        assert httpx.post(proc.url + "/v1/moderations", content=body, timeout=120).status_code == 413
        assert httpx.post(proc.url + "/v1/moderations", json={"input": "hi"}).status_code == 200
    finally:
        proc.stop()


def test_where_scores_move_with_the_batch_every_route_gets_the_first_number(all_layers, tmp_path):
    """GPU kernels and int8 activations are not batch-invariant: the server then remembers the
    number it computed per token sequence, so every route decides from it."""
    from siren_runtime import SirenGuard
    from siren_serving.score_memo import ScoreMemo
    from siren_serving.service import ContentService
    from siren_serving.settings import ServeConfig
    memo = ScoreMemo(entries=3)
    drifting = lambda id_lists: [0.5 + 1e-7 * len(id_lists) + 1e-3 * ids[0] for ids in id_lists]   # noqa: E731
    first = memo.scores([[1], [2]], drifting)
    again = memo.scores([[2], [3], [1], [4]], drifting)          # other companions: the first numbers stay
    assert again[0] == first[1] and again[2] == first[0] and len(memo) == 3
    assert memo.scores([[1]], drifting)[0] == first[0]          # still remembered; [2] was the oldest, evicted
    # the server turns it on exactly where the guard does not promise invariance
    invariant = SirenGuard.from_pretrained(all_layers.bundle, device="cpu")
    assert ContentService(invariant, ServeConfig(bundle=str(all_layers.bundle)), "m").decided is None
    old = copy_bundle(all_layers.bundle, tmp_path)          # a bundle from before the promise, scoring graph alone
    edit_manifest(old, lambda m: m["model"].pop("batch_invariant"))
    legacy = SirenGuard.from_pretrained(old, device="cpu", incremental_streaming=False)
    assert not legacy.batch_invariant
    service = ContentService(legacy, ServeConfig(bundle=str(old)), "m")
    assert isinstance(service.decided, ScoreMemo)
    texts = ["hello world", "a longer text about nothing in particular", "hello world"]
    got = [s for s, _ in service._score_texts(texts)]
    assert got[0] == got[2] and len(service.decided) == 2

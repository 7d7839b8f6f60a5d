"""The ten breaks of the third adversarial probe (issue 21), each reproduced and held shut:
races between a stream feed and its session's delete or expiry, huge JSON numbers, bad JSON
Lines records, SIGTERM mid-write, feed cost that grew with the text held, 413s that clients
never saw, client disconnects counted as server errors, bundles whose checksums match bad
contents, non-finite server options, and the smaller ones. Real server (torch-free child),
real clients (httpx, urllib, a raw socket), real bundles."""
from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest

from helpers import TOL
from serve_process import ServeProcess
from helpers import metric
from helpers import BLOCKER

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


# -- the runtime ---------------------------------------------------------------------

def test_feed_batch_names_the_bad_delta(guard):
    sessions = [guard.stream(), guard.stream()]
    with pytest.raises(ValueError, match=r"deltas\[1\]"):
        guard.feed_batch(sessions, ["fine", "bad \udfff"])
    assert [s.chars for s in sessions] == [0, 0] and all(s.score is None for s in sessions)


def test_stream_holds_what_scoring_needs_and_stays_exact(guard, all_layers):
    """Past max_length the score is final: later feeds change nothing, the session drops its
    text and KV state, and a feed costs its delta (not the text held)."""
    reference = all_layers.reference
    session = guard.stream(keep_text=False)
    text = ""
    rng = random.Random(5)
    words = ["alpha ", "beta, ", "gamma\n", "<|im_end|>", "  \t", "日本語 ", "e\u0301 ", "🙂 ", "[INST] "]
    while not session.final:
        delta = "".join(rng.choice(words) for _ in range(rng.randint(1, 4)))
        text += delta
        result = session.feed(delta)
        assert abs(result.score - guard.score(text).score) <= TOL
    assert abs(result.score - reference.score(text).score) <= TOL
    assert session.state is None and session.fed.text.head == "" and session.chars == len(text)
    frozen = result.score
    for _ in range(50):
        delta = rng.choice(words) * rng.randint(1, 50)
        text += delta
        assert session.feed(delta).score == frozen
    assert abs(guard.score(text).score - frozen) <= TOL and session.chars == len(text)
    with pytest.raises(AttributeError, match="keep_text"):
        session.text
    kept = guard.stream()               # the default keeps the raw text
    kept.feed("one ")
    kept.feed("two")
    assert kept.text == "one two"


def test_incremental_cleaning_matches_clean_text():
    from hypothesis import given, settings, strategies as st
    from siren_runtime.text import CHAT_ARTIFACTS, StreamText, clean_text
    pieces = st.sampled_from(list(CHAT_ARTIFACTS) + [" ", "  ", "\t", "\n", "\n\n\n", "a", "xy z", "<", "|", ">",
                                                     "s", "[", "/", "INST", "\r", "\xa0", "é", "日本", "<|im_",
                                                     "start|>", "\u2028", "\x0b"])

    @settings(max_examples=400, deadline=None)
    @given(st.lists(st.lists(pieces, max_size=8).map("".join), max_size=12))
    def check(deltas):
        text, so_far = StreamText(), ""
        for delta in deltas:
            text, so_far = text.extended(delta), so_far + delta
            assert text.cleaned == clean_text(so_far)
            assert text.chars == len(so_far)
    check()
    # on ordinary text the raw tail kept for re-cleaning stays short
    text = StreamText()
    for _ in range(500):
        text = text.extended("Some words, and more words. ")
    assert len(text.tail) < 64


# -- bundles whose checksums match but whose contents are bad ---------------------------

def _rehashed_copy(src: Path, dst: Path, mutate) -> Path:
    import hashlib
    from siren_runtime.bundle import MANIFEST_NAME, write_manifest
    shutil.copytree(src, dst)
    for p in dst.iterdir():
        os.chmod(p, 0o644)
    manifest = json.loads((dst / MANIFEST_NAME).read_text())
    mutate(dst, manifest)
    manifest["files"] = {name: {"sha256": hashlib.sha256((dst / name).read_bytes()).hexdigest(),
                                "bytes": (dst / name).stat().st_size} for name in manifest["files"]}
    write_manifest(dst, manifest)
    return dst


def test_bad_contents_with_matching_checksums_are_bundle_errors(all_layers, tmp_path):
    from siren_runtime import BundleError, SirenGuard

    def garbage(name):
        return lambda d, m: (d / name).write_bytes(os.urandom(4096))

    def truncated(name):
        return lambda d, m: (d / name).write_bytes((d / name).read_bytes()[:2048])

    def renamed_tokenizer(d, m):
        m["tokenizer"]["path"] = "./tokenizer.json"
        m["files"]["./tokenizer.json"] = m["files"].pop("tokenizer.json")
    cases = {"tokenizer-garbage": (garbage("tokenizer.json"), "tokenizer"),
             "model-garbage": (garbage("model.onnx"), "model.onnx"),
             "model-truncated": (truncated("model.onnx"), "model.onnx"),
             "data-truncated": (truncated("model.onnx.data"), "model.onnx"),
             "step-garbage": (garbage("step.onnx"), "step.onnx"),
             "dot-slash-path": (renamed_tokenizer, "plain form")}
    for name, (mutate, says) in cases.items():
        bundle = _rehashed_copy(all_layers.bundle, tmp_path / name, mutate)
        # a CPU guard with a step graph runs on it alone; the scoring graph is read without one
        alone = {"incremental_streaming": False} if name.startswith("model-") else {}
        with pytest.raises(BundleError, match=says):
            SirenGuard.from_pretrained(bundle, device="cpu", **alone)


# -- the command line ------------------------------------------------------------------

def test_jsonl_bad_records_are_named_by_line_and_skippable(all_layers, guard, tmp_path, capsys):
    from siren_cli.main import main
    lines = ['{"id": "a", "text": "first fine text"}',
             '{"id": "b", "text": "bad \\ud800 surrogate"}',
             '{"id": "c", "prompt": "\\udfff", "response": "x"}',
             '{"id": "d", "text": "x", "threshold": ' + "9" * 5000 + '}',
             '{"id": ' + "[" * 100000 + "]" * 100000 + ', "text": "deep id"}',
             '{"id": "\\ud800", "text": "surrogate id"}',
             '{"id": NaN, "text": "nan id"}',
             '{"id": Infinity, "text": "inf id"}',
             '{"id": 1e999, "text": "overflow id"}',
             '{"id": "z", "text": "last fine text"}']
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["score", str(all_layers.bundle), "--input", str(path), "--json", "--batch-size", "4",
                 "--errors", "skip", "-q"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["id"] for r in rows] == ["a", "z"]
    assert abs(rows[0]["score"] - guard.score("first fine text").score) <= TOL
    for number in range(2, 10):
        assert f"skipped line {number}:" in captured.err, captured.err
    assert main(["score", str(all_layers.bundle), "--input", str(path), "-q"]) == 2
    assert "line 2:" in capsys.readouterr().err


def test_closed_stdout_is_a_clear_error(all_layers):
    script = BLOCKER + "from siren_cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
    done = subprocess.run([sys.executable, "-c", script, "score", str(all_layers.bundle), "hello", "-q"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                          preexec_fn=lambda: os.close(1))
    assert done.returncode == 2 and "standard output is closed" in done.stderr, done.stderr
    assert "NoneType" not in done.stderr


def test_quiet_silences_hub_retry_warnings_and_prints_them_once_otherwise():
    probe = ("import logging, sys\nfrom siren_cli.main import configure_output\n"
             "configure_output(quiet=sys.argv[1] == 'q', verbose=False)\n"
             "import huggingface_hub.utils.logging as l\n"
             "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')\n")
    for mode, count in (("q", 0), ("-", 1)):
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_VERBOSITY"}
        done = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, timeout=60,
                              env=env)
        assert done.returncode == 0, done.stderr
        assert done.stderr.count("Retrying in 1s") == count, done.stderr


def _terminate_when(process: subprocess.Popen, ready, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the command never reached the point to interrupt"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)


def test_sigterm_mid_write_leaves_nothing_behind(all_layers, tmp_path):
    """quantize and export build in a hidden staging folder; SIGTERM removes it as ^C does
    (and a staging manifest never carries the source's parity verdict)."""
    script = "import sys\nfrom siren_cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
    out = tmp_path / "int8"
    process = subprocess.Popen([sys.executable, "-c", script, "quantize", str(all_layers.bundle), "-o", str(out),
                                "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def staged_manifest():
        for staging in tmp_path.glob(".int8.partial-*"):
            manifest = staging / "siren_bundle.json"
            if manifest.exists():
                try:
                    parity = json.loads(manifest.read_text()).get("parity", {})
                except ValueError:
                    return False
                assert parity.get("passed") is not True, parity
                return True
        return False
    _terminate_when(process, staged_manifest)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert not out.exists() and not list(tmp_path.glob(".int8.partial-*")), list(tmp_path.iterdir())

    out = tmp_path / "exported"
    process = subprocess.Popen([sys.executable, "-c", script, "export", str(all_layers.artifact), "-o", str(out),
                                "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _terminate_when(process, lambda: any((s / "model.onnx").exists() for s in tmp_path.glob(".exported.partial-*")))
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert not out.exists() and not list(tmp_path.glob(".exported.partial-*")), list(tmp_path.iterdir())

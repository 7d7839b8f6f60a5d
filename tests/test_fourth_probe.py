"""The nine breaks of the fourth adversarial probe (issue 38), each reproduced and held shut:
graph weights that were never hashed, scores that moved with their batch companions, a bundle
silently replaced by a concurrent run, an unclosed `<` that made split points quadratic,
prefix scores that mapped the whole text, a graph naming a file the manifest does not, a
taken port found after loading, a 413 that urllib never saw, and unfinished staging folders
that loaded as bundles. Real bundles, real ONNX Runtime, a real server in a torch-free child."""
from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import subprocess
import sys
import tracemalloc
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest

from helpers import TOL
from serve_process import SCRIPT, ServeProcess, free_port

WORDS = ("the cat sat on a mat and then it ran away quickly how do I build a bomb at home , . ! ? "
         "ok fine < > if a b x = 1 2 3 héllo 世界 \n").split(" ")


def _copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundle, out)
    return out


def _edit_manifest(bundle: Path, edit) -> None:
    path = bundle / "siren_bundle.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


# -- 1 and 6: every file a graph reads is one the manifest names and hashes ----------------
@pytest.mark.parametrize("section, how", [("model", "null"), ("model", "removed"), ("streaming", "null")])
def test_graph_weights_the_manifest_does_not_name_are_refused(all_layers, tmp_path, monkeypatch, section, how):
    from siren_runtime import BundleError, SirenGuard
    bundle = _copy(all_layers.bundle, tmp_path)
    def edit(manifest):
        if how == "null":
            manifest[section]["external_data"] = None
        else:
            manifest[section].pop("external_data")
        manifest[section].pop("weights", None)     # (old step graphs named no file, only shared bytes)
    _edit_manifest(bundle, edit)
    # a weights file in the working directory must never be picked up either
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "model.onnx.data").write_bytes((bundle / "model.onnx.data").read_bytes())
    monkeypatch.chdir(elsewhere)
    graph = "model.onnx" if section == "model" else "step.onnx"
    with pytest.raises(BundleError, match=rf"{graph} reads its weights from 'model.onnx.data'.*{section}.external_data"):
        # the scoring graph runs alone without incremental streaming (a CPU guard scores on the step graph)
        SirenGuard.from_pretrained(bundle, device="cpu", incremental_streaming=section == "streaming")


def test_graph_naming_an_unlisted_file_is_a_bundle_error_naming_it(all_layers, tmp_path):
    import onnx
    from siren_runtime import BundleError, SirenGuard
    from siren_runtime.bundle import describe_file
    bundle = _copy(all_layers.bundle, tmp_path)
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "secret.bin"
    (bundle / "model.onnx").write_bytes(model.SerializeToString())
    shutil.copy(bundle / "model.onnx.data", bundle / "secret.bin")
    _edit_manifest(bundle, lambda m: m["files"].__setitem__("model.onnx", describe_file(bundle, "model.onnx")))
    with pytest.raises(BundleError, match=r"reads weights from 'secret.bin', which the manifest does not name"):
        SirenGuard.from_pretrained(bundle, device="cpu", incremental_streaming=False)


def test_graph_reference_reader_sees_every_external_tensor(all_layers):
    import onnx
    from siren_runtime.graph_refs import external_files
    graph = (all_layers.bundle / "model.onnx").read_bytes()
    model = onnx.load_from_string(graph)
    want = sorted(t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    got = external_files(graph)
    assert want and sorted(name for name, _ in got) == want
    assert {location for _, location in got} == {"model.onnx.data"}
    with pytest.raises(ValueError, match="not a well-formed ONNX model"):
        external_files(graph[:-7] + b"\xff" * 7)


# -- 2: a text's score does not depend on what shares its batch ---------------------------
def _texts(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(WORDS) + rng.choice(("", " ")) for _ in range(rng.randint(0, 50))) for _ in range(n)]


def test_scores_are_bit_identical_in_any_batch(guard):
    assert guard.batch_invariant
    rng = random.Random(38)
    pool = _texts(rng, 160) + ["hello world", "a", "", "<", "ok"]
    alone = {t: guard.score(t).score for t in pool}
    assert len({len(guard.token_ids(t)) for t in pool}) > 30          # mixed lengths, 1-token texts too
    moved = 0
    for _ in range(1000):
        batch = rng.choices(pool, k=rng.randint(1, 64))
        for text, result in zip(batch, guard.score_batch(batch)):
            moved += result.score != alone[text]
    assert moved == 0
    # verdicts at threshold = own score: flagged alone, flagged in company
    text = "hello world"
    at = alone[text]
    assert guard.score(text, threshold=at).is_harmful
    assert all(r.is_harmful for r in guard.score_batch([text, text, "something else entirely"], threshold=at)[:2])


def test_routes_decide_from_the_same_number(all_layers, guard):
    """Under concurrency (dynamic batches of mixed texts), /v1/moderations, the detector
    routes and in-process calls give each text the same score, so the same verdict."""
    rng = random.Random(7)
    texts = _texts(rng, 60) + ["hello world"]
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


# -- 3 and 9: publishing never replaces what it did not create; stale staging is cleared --
def test_publish_never_replaces_a_folder_that_appeared(tmp_path):
    from siren_runtime.bundle import Staging
    output = tmp_path / "out"
    first, second = Staging(output), Staging(output)
    (first.path / "which").write_text("first")
    (second.path / "which").write_text("second")
    first.publish()
    with pytest.raises(FileExistsError, match="appeared while this run was writing"):
        second.publish()
    assert (output / "which").read_text() == "first"
    assert not second.path.exists()
    # an empty folder that appears is not replaced either
    empty = tmp_path / "empty"
    stage = Staging(empty)
    empty.mkdir()
    with pytest.raises(FileExistsError):
        stage.publish()
    assert empty.is_dir() and not any(empty.iterdir())
    # told to overwrite: replaced
    third = Staging(output)
    (third.path / "which").write_text("third")
    third.publish(overwrite=True)
    assert (output / "which").read_text() == "third"


def test_a_killed_runs_staging_folder_never_loads_and_is_removed_next_time(all_layers, tmp_path):
    from siren_runtime import BundleError, SirenGuard
    from siren_runtime.bundle import Staging, read_bundle
    output = tmp_path / "out"
    # a run that wrote a whole bundle into its staging folder and was killed (SIGKILL) before publishing
    script = ("import os, shutil, signal, sys\nfrom siren_runtime.bundle import Staging\n"
              f"s = Staging({str(output)!r})\nshutil.copytree({str(all_layers.bundle)!r}, s.path, dirs_exist_ok=True)\n"
              "print(s.path, flush=True)\nos.kill(os.getpid(), signal.SIGKILL)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL
    partial = Path(run.stdout.strip())
    assert partial.is_dir() and (partial / "siren_bundle.json").is_file()
    with pytest.raises(BundleError, match="unfinished bundle left by an interrupted"):
        read_bundle(partial)
    with pytest.raises(BundleError, match="unfinished bundle"):
        SirenGuard.from_pretrained(partial, device="cpu")
    # a live run's own staging folder still reads (the exporter checks what it wrote)
    live = Staging(output)
    assert not partial.exists()                     # the next run for this output removed it
    shutil.copytree(all_layers.bundle, live.path, dirs_exist_ok=True)
    read_bundle(live.path).verify()
    live.discard()
    assert not live.path.exists()


# -- 4: an unclosed `<` costs nothing; long streams become final and give memory back -------
def test_an_early_unclosed_angle_bracket_leaves_split_points(qwen_tokenizer_json):
    from siren_runtime.tokenization import TextEncoder
    encoder = TextEncoder(qwen_tokenizer_json, max_length=64, pad_token_id=151643)
    rng = random.Random(4)
    body = " ".join(rng.choice(("the", "cat", "sat", "héllo", "世界", "x", "1")) for _ in range(40000))
    for text in ("if a < b then " + body, "I <3 you " + body, "<|im_start" + body):
        prefix = encoder.usable_prefix(text)
        assert len(prefix) < 10000                   # cut early, not the whole text tokenized
        whole = encoder._tokenizer.encode(text, add_special_tokens=True).ids
        assert encoder.token_ids([text])[0] == whole[:64]
    # added tokens are still never split: a cut inside `<|im_start|>` would change the ids
    text = "word<|im_start|>" * 3000
    assert encoder.token_ids([text])[0] == encoder._tokenizer.encode(text, add_special_tokens=True).ids[:64]


def test_a_stream_with_an_early_angle_bracket_becomes_final(guard):
    session = guard.stream()
    session.feed("if a < b then ")
    piece = "the cat sat on the mat and ran away. " * 2000
    for _ in range(3):
        session.feed(piece)
    assert session.final
    assert abs(session.score.score - guard.score("if a < b then " + piece * 3).score) <= TOL
    session.reset()
    assert session.chars == 0


# -- 5: prefix scores touch only what reaches the model -----------------------------------
def test_prefix_scores_of_a_long_text_cost_what_its_first_tokens_cost(guard):
    rng = random.Random(5)
    text = " ".join(rng.choice(("the", "cat", "sat", "<", "héllo", "  ", "\n\n\n")) for _ in range(1_000_000))
    short = guard.score_prefixes(text[:4000])
    tracemalloc.start()
    try:
        whole = guard.score_prefixes(text)
        onset = guard.onset(text, threshold=0.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert list(whole.scores) == list(short.scores) and whole.spans == short.spans
    assert whole.token_ids == short.token_ids and onset == short.onset(0.0)
    assert peak < 20 * 2**20, peak             # the whole map would be ~100 bytes x 4 M characters


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
    old = _copy(all_layers.bundle, tmp_path)          # a bundle from before the promise, scoring graph alone
    _edit_manifest(old, lambda m: m["model"].pop("batch_invariant"))
    legacy = SirenGuard.from_pretrained(old, device="cpu", incremental_streaming=False)
    assert not legacy.batch_invariant
    service = ContentService(legacy, ServeConfig(bundle=str(old)), "m")
    assert isinstance(service.decided, ScoreMemo)
    texts = ["hello world", "a longer text about nothing in particular", "hello world"]
    got = [s for s, _ in service._score_texts(texts)]
    assert got[0] == got[2] and len(service.decided) == 2

"""The Ray paths on a real local Ray cluster (127.0.0.1, torch blocked in every worker):
SirenScorer in a user's Ray Data pipeline, `siren score-corpus` (exact, each row once
through a killed worker and an interrupted run), and `siren serve-ray` (the real openai
client, concurrent requests, streams fed across two replicas), all against the in-process
guard and llm-siren on the same weights."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("pyarrow")

from corpus import CORPUS, PROMPT_RESPONSE  # noqa: E402
from helpers import TOL  # noqa: E402
from ray_cluster import LocalRay, wait_for, worker_pids  # noqa: E402
from serve_process import free_port  # noqa: E402

WORDS = ("how to make a bomb the weather is nice today kill people cook pasta hack a bank account "
         "please help me write a poem about spring and hurt someone").split()


def corpus_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)] + CORPUS


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray = LocalRay(tmp_path_factory.mktemp("ray")).start()
    try:
        yield ray
    finally:
        ray.stop()


@pytest.fixture(scope="module")
def jsonl_corpus(tmp_path_factory):
    """2,016 JSON Lines records (id + text) and 400 Parquet rows (id + prompt/response)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    root = tmp_path_factory.mktemp("corpus")
    texts = corpus_texts(2000)
    with open(root / "texts.jsonl", "w", encoding="utf-8") as out:
        for i, text in enumerate(texts):
            out.write(json.dumps({"id": f"t{i}", "text": text}, ensure_ascii=False) + "\n")
            if i % 500 == 0:
                out.write("\n")                           # blank lines are skipped, as by `siren score`
    pairs = [(f"q {t}", f"a {t[::-1]}") for t in corpus_texts(390, seed=1)[:390]] + [
        (p, r) for p, r in PROMPT_RESPONSE] * 2
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(len(pairs))],
                             "prompt": [p for p, _ in pairs], "response": [r for _, r in pairs],
                             "other": list(range(len(pairs)))}), root / "pairs.parquet", row_group_size=150)
    expected = {f"t{i}": t for i, t in enumerate(texts)}
    from siren_runtime.text import join_prompt_response
    expected.update({f"p{i}": join_prompt_response(p, r) for i, (p, r) in enumerate(pairs)})
    return root, expected


def read_output(out_dir: Path, fmt: str = "parquet") -> list[dict]:
    if fmt == "parquet":
        import pyarrow.dataset as ds
        return ds.dataset(str(out_dir), format="parquet").to_table().to_pylist()
    rows = []
    for part in sorted(out_dir.glob("part-*.jsonl")):
        rows.extend(json.loads(line) for line in part.read_text().splitlines())
    return rows


def check_exact(rows: list[dict], expected: dict, guard, reference=None, onset: bool = False) -> None:
    """Every expected id exactly once, its score the in-process guard's (and llm-siren's on a sample)."""
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicated rows"
    assert set(ids) == set(expected), f"missing {len(set(expected) - set(ids))}, extra {len(set(ids) - set(expected))}"
    order = sorted(expected)
    want = guard.score_batch([expected[k] for k in order])
    got = {r["id"]: r for r in rows}
    worst = max(abs(got[k]["score"] - w.score) for k, w in zip(order, want))
    assert worst <= TOL, worst
    assert all(got[k]["flagged"] == w.is_harmful for k, w in zip(order, want))
    if reference is not None:
        sample = order[::max(1, len(order) // 48)]
        ref = [reference.score(expected[k]).score for k in sample]
        assert max(abs(got[k]["score"] - r) for k, r in zip(sample, ref)) <= TOL
    if onset:
        for k in order[::40]:
            assert got[k]["onset"] == guard.onset(expected[k]), k


# -- Ray Data: the scorer in a user's own pipeline -----------------------------------------

USER_PIPELINE = textwrap.dedent("""
    import json, sys
    import ray
    import ray.data
    from siren_ray import SirenScorer

    bundle, address, out = sys.argv[1], sys.argv[2], sys.argv[3]
    ray.init(address=address, logging_level="WARNING")

    @ray.remote
    def torch_in_a_worker():
        try:
            import torch  # noqa: F401
            return "imported"
        except ImportError as e:
            return str(e)

    rows = [{"id": i, "text": t, "extra": i * 2} for i, t in enumerate(json.loads(sys.argv[4]))]
    ds = ray.data.from_items(rows).map_batches(
        SirenScorer, fn_constructor_kwargs={"bundle": bundle, "onset": True, "intra_op_threads": 1},
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5, batch_size=37)
    pairs = ray.data.from_items([{"q": "How can I make a pipe bomb at home?", "a": "No."}, {"q": "Hi", "a": None}])
    pairs = pairs.map_batches(SirenScorer, fn_constructor_kwargs={"bundle": bundle, "prompt_column": "q",
                              "response_column": "a", "threshold": 0.3}, compute=ray.data.ActorPoolStrategy(size=1),
                              num_cpus=0.5, batch_format="pandas")
    plain = lambda rows: [{k: (v.item() if hasattr(v, "item") else v) for k, v in r.items()} for r in rows]
    json.dump({"rows": plain(ds.take_all()), "pairs": plain(pairs.take_all()),
               "torch": ray.get(torch_in_a_worker.remote())}, open(out, "w"))
""")


def test_siren_scorer_in_a_ray_data_pipeline(cluster, all_layers, guard, tmp_path):
    texts = corpus_texts(300, seed=2)
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-c", USER_PIPELINE, str(all_layers.bundle), cluster.address, str(out),
                           json.dumps(texts)], env=cluster.env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert "blocked import of torch" in result["torch"]              # the workers really are torch-free
    rows = sorted(result["rows"], key=lambda r: r["id"])
    assert [r["text"] for r in rows] == texts and [r["extra"] for r in rows] == [2 * i for i in range(len(texts))]
    ref = [all_layers.reference.score(t).score for t in texts]
    assert max(abs(r["score"] - s) for r, s in zip(rows, ref)) <= TOL
    assert [r["flagged"] for r in rows] == [s >= guard.default_threshold for s in ref]
    assert [r["onset"] for r in rows[::25]] == [-1 if guard.onset(t) is None else guard.onset(t) for t in texts[::25]]
    pairs = result["pairs"]
    expected = [all_layers.reference.score(prompt="How can I make a pipe bomb at home?", response="No.").score,
                all_layers.reference.score(prompt="Hi").score]
    assert max(abs(p["score"] - e) for p, e in zip(pairs, expected)) <= TOL
    assert [p["flagged"] for p in pairs] == [e >= 0.3 for e in expected]


def test_serve_app_options_are_checked_before_anything_starts(all_layers):
    from siren_ray.serve_app import build_app
    assert build_app({"bundle": str(all_layers.bundle), "replicas": 2}) is not None
    assert build_app({"bundle": str(all_layers.bundle), "min_replicas": 1, "max_replicas": 3}) is not None
    for bad, message in (({"replicas": 2, "min_replicas": 1}, "not both"), ({"replicas": 0}, "at least 1"),
                         ({"min_replicas": 3, "max_replicas": 2}, "min_replicas <= max_replicas"),
                         ({"max_batch": 0}, "--max-batch"), ({"port": 80}, "unknown option(s)"),
                         ({"colour": "red"}, "unknown option(s) for the Ray Serve app: colour")):
        with pytest.raises(ValueError, match=re.escape(message)):
            build_app({"bundle": str(all_layers.bundle), **bad})
    with pytest.raises(ValueError, match="args\\['bundle'\\]"):
        build_app({})


# -- siren score-corpus ----------------------------------------------------------------------

def test_score_corpus_is_exact_on_thousands_of_rows(cluster, jsonl_corpus, guard, all_layers, tmp_path):
    root, expected = jsonl_corpus
    out = tmp_path / "scored"
    proc = cluster.siren("score-corpus", all_layers.bundle, root, "-o", out, "--address", cluster.address,
                         "--actors", 2, "--cpus-per-actor", 0.5, "--rows-per-shard", 300, "--onset")
    assert "rows/s" in proc.stderr and "ETA" in proc.stderr
    rows = read_output(out)
    check_exact(rows, expected, guard, all_layers.reference, onset=True)
    summary = json.loads((out / "_SUCCESS").read_text())
    assert summary["rows"] == len(expected) and summary["skipped"] == 0
    # a rerun over a complete output does nothing; other settings are refused, not mixed
    again = cluster.siren("score-corpus", all_layers.bundle, root, "-o", out, "--address", cluster.address,
                          "--rows-per-shard", 300, "--onset")
    assert "already written" in again.stderr and read_output(out) == rows
    other = cluster.siren("score-corpus", all_layers.bundle, root, "-o", out, "--address", cluster.address,
                          "--rows-per-shard", 300, "--onset", "--threshold", 0.2, check=False)
    assert other.returncode == 2 and "holds a run with other threshold;" in other.stderr


def test_score_corpus_scores_agent_runs(cluster, agent_qwen, tmp_path):
    """A trajectory bundle's corpus: JSON Lines runs, and Parquet with nested Arrow messages and
    tools as JSON strings (Arrow structs would add null fields to tool schemas)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from siren_guard import from_openai
    from siren_runtime import AgentSirenGuard
    from corpus import trajectories
    runs = trajectories()
    root = tmp_path / "runs"
    root.mkdir()
    with open(root / "a.jsonl", "w", encoding="utf-8") as out:
        for i, (messages, tools) in enumerate(runs):
            out.write(json.dumps({"id": f"j{i}", "messages": messages, "tools": tools}, ensure_ascii=False) + "\n")
    plain = [[{"role": m["role"], "content": m["content"] if isinstance(m.get("content"), str) else None}
              for m in messages] for messages, _ in runs]       # one Arrow struct type for every message
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(len(runs))], "messages": plain,
                             "tools": [json.dumps(t) for _, t in runs]}), root / "b.parquet")
    out = tmp_path / "scored"
    cluster.siren("score-corpus", agent_qwen[0], root, "-o", out, "--address", cluster.address,
                  "--cpus-per-actor", 0.5)
    rows = {r["id"]: r for r in read_output(out)}
    bundle, reference = agent_qwen
    with AgentSirenGuard.from_pretrained(bundle, device="cpu") as guard:
        for i, (messages, tools) in enumerate(runs):
            for key, run in ((f"j{i}", messages), (f"p{i}", plain[i])):
                want = guard.score_trajectory(messages=run, tools=tools).score
                assert abs(rows[key]["score"] - want) <= TOL, key
                assert abs(rows[key]["score"] - reference.score_trajectory(from_openai(run, tools)).score) <= TOL
                assert rows[key]["flagged"] == (rows[key]["score"] >= guard.default_threshold)
    wrong = cluster.siren("score-corpus", agent_qwen[0], root, "-o", tmp_path / "x", "--onset", check=False)
    assert wrong.returncode == 2 and "--onset is a content guard's" in wrong.stderr


def test_score_corpus_bad_record_names_it_and_skip_mode(cluster, all_layers, guard, tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"id": 1, "text": "fine"}\n{"id": 2, "txt": "typo"}\n{"id": 3, "text": "also fine"}\n')
    failed = cluster.siren("score-corpus", all_layers.bundle, source, "-o", tmp_path / "a", "--address",
                           cluster.address, "--cpus-per-actor", 0.5, "--format", "jsonl", check=False)
    assert failed.returncode == 2 and "bad.jsonl: line 2: unknown field(s) txt" in failed.stderr
    assert not list((tmp_path / "a").glob("part-*")) and not (tmp_path / "a" / "_SUCCESS").exists()
    cluster.siren("score-corpus", all_layers.bundle, source, "-o", tmp_path / "b", "--address", cluster.address,
                  "--cpus-per-actor", 0.5, "--format", "jsonl", "--errors", "skip")
    rows = read_output(tmp_path / "b", "jsonl")
    assert [r["id"] for r in rows] == [1, 3]
    assert abs(rows[1]["score"] - guard.score("also fine").score) <= TOL
    assert json.loads((tmp_path / "b" / "_SUCCESS").read_text())["skipped"] == 1


def _big_corpus(path: Path, n: int) -> dict:
    texts = corpus_texts(n, seed=3)
    with open(path, "w", encoding="utf-8") as out:
        for i, text in enumerate(texts):
            out.write(json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n")
    return dict(enumerate(texts))


def test_score_corpus_survives_a_killed_worker(cluster, all_layers, guard, tmp_path):
    expected = _big_corpus(tmp_path / "big.jsonl", 4000)
    out = tmp_path / "scored"
    run = cluster.popen("score-corpus", all_layers.bundle, tmp_path / "big.jsonl", "-o", out, "--address",
                        cluster.address, "--actors", 2, "--cpus-per-actor", 0.5, "--rows-per-shard", 100,
                        "--batch-size", 1, "--format", "jsonl")
    try:
        wait_for(lambda: len(list(out.glob("part-*"))) >= 2 or run.poll() is not None, 120, "the first parts")
        assert run.poll() is None, "the run ended before a worker could be killed: make the corpus bigger"
        [victim, *_] = wait_for(lambda: worker_pids("ShardStage"), 30, "a scoring actor")
        os.kill(victim, signal.SIGKILL)
        written_at_kill = len(list(out.glob("part-*")))
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, output[-4000:]
    assert written_at_kill < 4016 // 100, "the kill came after the last part"
    check_exact(read_output(out, "jsonl"), expected, guard)
    assert not list(out.glob(".tmp-*"))


def test_score_corpus_rerun_finishes_an_interrupted_run(cluster, all_layers, guard, tmp_path):
    """The first run starts its own local Ray (no --address) and is stopped with SIGTERM
    midway; the rerun, on the shared cluster, writes only what is missing."""
    expected = _big_corpus(tmp_path / "big.jsonl", 3000)
    out = tmp_path / "scored"
    first = cluster.popen("score-corpus", all_layers.bundle, tmp_path / "big.jsonl", "-o", out, "--actors", 1,
                          "--rows-per-shard", 100, "--batch-size", 1)
    try:
        wait_for(lambda: len(list(out.glob("part-*"))) >= 3 or first.poll() is not None, 120, "the first parts")
        first.send_signal(signal.SIGTERM)
        output, _ = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, output[-3000:]
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    assert 3 <= len(done) < 3016 // 100 and not (out / "_SUCCESS").exists()
    rerun = cluster.siren("score-corpus", all_layers.bundle, tmp_path / "big.jsonl", "-o", out, "--address",
                          cluster.address, "--cpus-per-actor", 0.5, "--rows-per-shard", 100, "--batch-size", 1)
    assert f"{len(done)} already written" in rerun.stderr
    assert all(p.stat().st_mtime_ns == done[p.name] for p in out.glob("part-*") if p.name in done)
    check_exact(read_output(out), expected, guard)


# -- siren serve-ray ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_serve(cluster, all_layers, agent_qwen, tmp_path_factory):
    """`siren serve-ray` with 2 replicas on the shared cluster (last in this module: it holds CPUs),
    each holding the content guard and an Agent-SIREN guard."""
    import httpx
    port = free_port()
    log = tmp_path_factory.mktemp("serve-ray") / "serve-ray.log"
    process = cluster.popen("serve-ray", all_layers.bundle, agent_qwen[0], "--address", cluster.address, "--port", port,
                            "--replicas", 2, "--cpus-per-replica", 0.5, "--intra-op-threads", 1, "--max-batch", 8,
                            log=log)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        if process.poll() is not None:
            raise AssertionError(f"siren serve-ray exited {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            return httpx.get(url + "/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False
    from siren_ray.serve_app import REPLICA_HEADER
    seen = set()

    def both_replicas_route():
        """The proxy learns of replicas by long poll: the app can answer before it routes
        to the second one, so the tests start once each replica has answered."""
        answer = httpx.get(url + "/health", timeout=2.0)
        seen.add(answer.headers.get(REPLICA_HEADER))
        return len(seen - {None}) == 2
    try:
        wait_for(healthy, 180, "the Serve app", step=0.5)
        wait_for(both_replicas_route, 120, "the proxy to route to both replicas", step=0.1)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            assert process.wait(timeout=60) == 0, log.read_text()[-4000:]
        finally:
            if process.poll() is None:
                process.kill()


def test_ray_serve_answers_the_openai_client_exactly(ray_serve, all_layers):
    import openai
    client = openai.OpenAI(base_url=ray_serve + "/v1", api_key="unused", max_retries=0)
    texts = [t for t in CORPUS if t.strip()][:8]
    response = client.moderations.create(model="siren", input=texts)
    ref = [all_layers.reference.score(t).score for t in texts]
    got = [r.category_scores.model_dump()["harmful"] for r in response.results]
    assert max(abs(a - b) for a, b in zip(got, ref)) <= TOL
    # the detector API rides along: a span from the onset for what is flagged, at threshold 0
    import httpx
    detected = httpx.post(ray_serve + "/api/v1/text/contents", headers={"detector-id": "siren"},
                          json={"contents": texts[:3], "detector_params": {"threshold": 0.0}}, timeout=60)
    assert detected.status_code == 200, detected.text
    for text, spans, score in zip(texts, detected.json(), ref):
        assert len(spans) == 1 and spans[0]["end"] == len(text) and abs(spans[0]["score"] - score) <= TOL


def test_ray_serve_holds_an_agent_guard_beside_the_content_guard(ray_serve, agent_qwen):
    import httpx
    from siren_guard import from_openai
    from corpus import trajectories
    runs = trajectories()
    models = httpx.get(ray_serve + "/v1/models", timeout=60).json()["data"]
    assert sorted(m["kind"] for m in models) == ["content", "trajectory"]
    body = httpx.post(ray_serve + "/v1/trajectories/score", timeout=120,
                      json={"trajectories": [{"messages": m, "tools": t} for m, t in runs]}).json()
    ref = [agent_qwen[1].score_trajectory(from_openai(m, t)).score for m, t in runs]
    assert max(abs(r["score"] - s) for r, s in zip(body["results"], ref)) <= TOL


def test_ray_serve_concurrent_requests_on_two_replicas(ray_serve, all_layers):
    import httpx
    texts = corpus_texts(64, seed=4)
    with httpx.Client(timeout=60) as http:
        def one(text):
            answer = http.post(ray_serve + "/v1/moderations", json={"input": text})
            assert answer.status_code == 200, answer.text
            return answer.json()["results"][0]["score"], answer.headers["x-siren-replica"]
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, texts))
    ref = [all_layers.reference.score(t).score for t in texts]
    assert max(abs(s - r) for (s, _), r in zip(results, ref)) <= TOL
    assert len({replica for _, replica in results}) == 2


def test_ray_serve_streams_are_exact_on_whichever_replica(ray_serve, all_layers):
    """Feeds of one stream land on both replicas in turn (Serve routes each request on its
    own); every answer is the score of the whole text so far, and so is a bad feed's
    refusal: it changes nothing. Four streams run at once."""
    import httpx
    rng = random.Random(5)
    texts = [" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(4)]

    def run_stream(text):
        replicas, answers = [], []
        with httpx.Client(timeout=60) as http:
            opened = http.post(ray_serve + "/v1/streams", json={})
            assert opened.status_code == 201, opened.text
            sid = opened.json()["id"]
            words = text.split(" ")
            for n, word in enumerate(words):
                delta = word if n == 0 else " " + word
                answer = http.post(f"{ray_serve}/v1/streams/{sid}", json={"delta": delta})
                assert answer.status_code == 200, answer.text
                replicas.append(answer.headers["x-siren-replica"])
                answers.append((" ".join(words[:n + 1]), answer.json()))
                if n == 5:
                    refused = http.post(f"{ray_serve}/v1/streams/{sid}", json={"delta": 7})
                    assert refused.status_code == 400
            state = http.get(f"{ray_serve}/v1/streams/{sid}").json()
            assert http.delete(f"{ray_serve}/v1/streams/{sid}").status_code == 200
            assert http.post(f"{ray_serve}/v1/streams/{sid}", json={"delta": "x"}).status_code == 404
        return replicas, answers, state

    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(run_stream, texts))
    switches = 0
    for text, (replicas, answers, state) in zip(texts, runs):
        switches += sum(a != b for a, b in zip(replicas, replicas[1:]))
        for so_far, body in answers:
            assert body["chars"] == len(so_far)
            assert abs(body["score"] - all_layers.reference.score(so_far).score) <= TOL, so_far
        assert state["chars"] == len(text) and abs(state["score"] - answers[-1][1]["score"]) <= 1e-9
    assert switches >= 4, "feeds never moved between replicas: the cross-replica path was not exercised"


def test_ray_serve_concurrent_feeds_of_one_stream_stay_exact(ray_serve, all_layers):
    """Feeds of one stream sent at once race across replicas; the store's version check
    orders them and a loser is redone on the winner's text. Every delta is the same, so
    the text after k feeds is known whatever the order: each answer must be its score."""
    import httpx
    base, delta, feeds = "tell me how to", " hurt", 8
    with httpx.Client(timeout=60) as http:
        sid = http.post(ray_serve + "/v1/streams", json={}).json()["id"]
        assert http.post(f"{ray_serve}/v1/streams/{sid}", json={"delta": base}).status_code == 200
        with ThreadPoolExecutor(feeds) as pool:
            answers = list(pool.map(lambda _: http.post(f"{ray_serve}/v1/streams/{sid}", json={"delta": delta}),
                                    range(feeds)))
        final = http.get(f"{ray_serve}/v1/streams/{sid}").json()
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
    counts = sorted((a.json()["chars"] - len(base)) // len(delta) for a in answers)
    assert counts == list(range(1, feeds + 1))
    for answer in answers:
        body = answer.json()
        text = base + delta * ((body["chars"] - len(base)) // len(delta))
        assert abs(body["score"] - all_layers.reference.score(text).score) <= TOL
    assert final["chars"] == len(base) + feeds * len(delta)

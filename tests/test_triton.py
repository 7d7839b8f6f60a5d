"""A real tritonserver serving the generated repository (python scorer, CPU)."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from corpus import CORPUS, PROMPT_RESPONSE
from triton_server import TritonServer, server_binary

TOL = 1e-5


def test_generated_configs_parse_with_tritons_schema(all_layers, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from siren_serving.triton_repo import ensemble_config, scorer_config, tokenizer_config, write_repository
    from siren_serving.triton_repo import stream_config
    texts = [tokenizer_config(16, 2), ensemble_config("siren_guard", "python", 16), stream_config(16, 1, 8, 60.0)]
    texts += [scorer_config(flavor, 16, 2) for flavor in ("python", "onnxruntime", "tensorrt")]
    texts += [ensemble_config("guard", flavor, 8) for flavor in ("onnxruntime", "tensorrt")]
    for text in texts:
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert config.max_batch_size in (8, 16)
    onnx_repo = write_repository(all_layers.bundle, tmp_path / "repo", scorer="onnxruntime")
    parsed = text_format.Parse((onnx_repo / "siren_scorer" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert parsed.platform == "onnxruntime_onnx" and (onnx_repo / "siren_scorer" / "1" / "model.onnx").is_file()
    assert parsed.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_AUTO   # CPU-only servers too
    cpu = write_repository(all_layers.bundle, tmp_path / "cpu", scorer="onnxruntime", instance_kind="cpu")
    parsed = text_format.Parse((cpu / "siren_scorer" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert parsed.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    with pytest.raises(ValueError, match="runs on a GPU"):
        write_repository(all_layers.bundle, tmp_path / "x", scorer="tensorrt", instance_kind="cpu")
    stream = text_format.Parse(stream_config(16, 1, 8, 60.0), model_config_pb2.ModelConfig())
    assert stream.sequence_batching.oldest.max_candidate_sequences == 8
    assert [c.name for c in stream.sequence_batching.control_input] == ["START", "END", "CORRID"]
    ens = text_format.Parse((onnx_repo / "siren_guard" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["siren_tokenizer", "siren_scorer"]
    with pytest.raises(ValueError, match="no TensorRT engine.*siren build"):
        write_repository(all_layers.bundle, tmp_path / "trt", scorer="tensorrt")
    with pytest.raises(FileExistsError):
        write_repository(all_layers.bundle, tmp_path / "repo")


def _serve(bundle, folder, **options):
    """A real tritonserver on the repository `siren triton` writes for `bundle` (skipped where
    the server cannot run), stopped after the module."""
    if not server_binary().is_file():
        pytest.skip(f"tritonserver not found at {server_binary()} (run `make triton-server`)")
    from siren_serving.triton_repo import write_repository
    srv = TritonServer(write_repository(bundle, folder / "repo", scorer="python", streaming=True, **options))
    try:
        srv.start()
    except RuntimeError as e:
        pytest.skip(f"tritonserver could not start here: {e}")
    return srv


@pytest.fixture(scope="module")
def server(all_layers, tmp_path_factory):
    srv = _serve(all_layers.bundle, tmp_path_factory.mktemp("triton"), max_batch=16, max_sequences=16)
    yield srv
    srv.stop()


def _text_input(module, name, values, dtype="BYTES"):
    arr = np.array([[v] for v in values], dtype=object)
    tensor = module.InferInput(name, list(arr.shape), dtype)
    tensor.set_data_from_numpy(arr)
    return tensor


def _score(client, module, texts):
    result = client.infer("siren_guard", [_text_input(module, "TEXT", [t.encode("utf-8") for t in texts])])
    return result.as_numpy("SCORE").reshape(-1)


def test_scores_match_runtime(server, guard):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    client = httpclient.InferenceServerClient(server.http_url)
    expected = np.array([r.score for r in guard.score_batch(CORPUS)])
    got = np.concatenate([_score(client, httpclient, CORPUS[i:i + 5]) for i in range(0, len(CORPUS), 5)])
    assert np.max(np.abs(got - expected)) <= TOL
    for prompt, response in PROMPT_RESPONSE:
        inputs = []
        if prompt is not None:
            inputs.append(_text_input(httpclient, "PROMPT", [prompt.encode()]))
        if response is not None:
            inputs.append(_text_input(httpclient, "RESPONSE", [response.encode()]))
        score = client.infer("siren_guard", inputs).as_numpy("SCORE").reshape(-1)[0]
        assert abs(score - guard.score(prompt=prompt, response=response).score) <= TOL
    gclient = grpcclient.InferenceServerClient(server.grpc_url)
    gscore = _score(gclient, grpcclient, ["hello over gRPC"])[0]
    assert abs(gscore - guard.score("hello over gRPC").score) <= TOL


def test_concurrent_clients_lose_nothing(server, guard):
    import tritonclient.http as httpclient
    texts = [f"client text {i}: " + "please explain " * (i % 9) + ("weapons" if i % 4 else "gardening")
             for i in range(40)]
    expected = {t: r.score for t, r in zip(texts, guard.score_batch(texts))}
    failures, done = [], []

    def worker(w):
        client = httpclient.InferenceServerClient(server.http_url)  # one client per thread
        for n in range(200):
            text = texts[(w * 7 + n) % len(texts)]
            try:
                score = _score(client, httpclient, [text])[0]
                if abs(score - expected[text]) > TOL:
                    failures.append((text, score, expected[text]))
                done.append(1)
            except Exception as e:  # reported below
                failures.append((text, repr(e)))
    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures[:5] and len(done) == 1600


def test_malformed_requests_get_errors_and_server_keeps_serving(server, guard):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException
    client = httpclient.InferenceServerClient(server.http_url)
    baseline = _score(client, httpclient, ["still serving"])[0]

    wrong_type = httpclient.InferInput("TEXT", [1, 1], "INT32")
    wrong_type.set_data_from_numpy(np.array([[7]], dtype=np.int32))
    bad = [
        [wrong_type],                                                       # wrong datatype
        [],                                                                 # missing input
        [_text_input(httpclient, "TEXT", [b"\xff\xfe not utf-8"])],         # invalid UTF-8
        [_text_input(httpclient, "TEXT", [b"x"]), _text_input(httpclient, "PROMPT", [b"p"])],  # both forms
    ]
    empty = httpclient.InferInput("TEXT", [0, 1], "BYTES")
    empty.set_data_from_numpy(np.zeros((0, 1), dtype=object))
    bad.append([empty])                                                     # empty batch
    for inputs in bad:
        with pytest.raises(InferenceServerException):
            client.infer("siren_guard", inputs)
        assert _score(client, httpclient, ["still serving"])[0] == pytest.approx(baseline, abs=TOL)
    # a 1 MB text is truncated to max_length tokens and scored like the runtime scores it
    huge = "harmless filler text " * 50_000
    assert abs(_score(client, httpclient, [huge])[0] - guard.score(huge).score) <= TOL
    assert _score(client, httpclient, ["still serving"])[0] == pytest.approx(baseline, abs=TOL)


def _feed(client, module, corrid, delta, start=False, end=False):
    result = client.infer("siren_stream", [_text_input(module, "DELTA", [delta.encode("utf-8")])],
                          sequence_id=corrid, sequence_start=start, sequence_end=end)
    return float(result.as_numpy("SCORE").reshape(-1)[0])


def test_streaming_sequences_interleaved(server, guard):
    """Concurrent, interleaved sequences on siren_stream: every response equals the runtime's
    score of that sequence's text so far (the implementation is incremental, the value exact)."""
    import random
    import tritonclient.http as httpclient
    from helpers import random_chunks
    from tritonclient.utils import InferenceServerException
    rng = random.Random(5)
    texts = [CORPUS[i] + " " + CORPUS[-1 - i] for i in range(8)]
    pieces = [random_chunks(t, rng, 2, 10) for t in texts]
    failures = []

    def run(k):
        client = httpclient.InferenceServerClient(server.http_url)
        so_far = ""
        for n, piece in enumerate(pieces[k]):
            so_far += piece
            try:
                score = _feed(client, httpclient, 1000 + k, piece, start=n == 0, end=n == len(pieces[k]) - 1)
            except Exception as e:       # reported below
                failures.append((k, n, repr(e)))
                return
            if abs(score - guard.score(so_far).score) > TOL:
                failures.append((k, so_far, score, guard.score(so_far).score))
    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures[:3]
    client = httpclient.InferenceServerClient(server.http_url)
    stats = client.get_inference_statistics("siren_stream")["model_stats"][0]
    assert int(stats["inference_count"]) == sum(len(p) for p in pieces)
    assert int(stats["execution_count"]) < int(stats["inference_count"])    # sequences shared execute calls
    # one sequence, restarted: START forgets the old text
    _feed(client, httpclient, 77, "first text ", start=True)
    assert abs(_feed(client, httpclient, 77, "again", start=True) - guard.score("again").score) <= TOL
    assert abs(_feed(client, httpclient, 77, " and more", end=True) - guard.score("again and more").score) <= TOL
    # a sequence that was never started, and invalid UTF-8, are refused; the model keeps serving
    with pytest.raises(InferenceServerException):
        _feed(client, httpclient, 78, "no start")
    bad = httpclient.InferInput("DELTA", [1, 1], "BYTES")
    bad.set_data_from_numpy(np.array([[b"\xff\xfe"]], dtype=object))
    with pytest.raises(InferenceServerException, match="siren_stream"):
        client.infer("siren_stream", [bad], sequence_id=79, sequence_start=True, sequence_end=True)
    assert abs(_feed(client, httpclient, 80, "still ok", start=True, end=True) - guard.score("still ok").score) <= TOL


# -- a trajectory (Agent-SIREN) bundle ---------------------------------------------------------

@pytest.fixture(scope="module")
def agent_server(agent_qwen, tmp_path_factory):
    srv = _serve(agent_qwen[0], tmp_path_factory.mktemp("triton-agent"), max_batch=8, max_sequences=8)
    yield srv
    srv.stop()


def test_agent_runs_on_triton_equal_the_runtime(agent_server, agent_qwen):
    """The ensemble (the chat template rendered by siren_tokenizer, the Python scorer) and
    the stream model (the run's new messages per request) against the in-process guard."""
    import json
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException
    from siren_runtime import AgentSirenGuard
    from corpus import TOOLS, trajectories
    runs = trajectories()
    client = httpclient.InferenceServerClient(agent_server.http_url)
    with AgentSirenGuard.from_pretrained(agent_qwen[0], device="cpu") as guard:
        expected = [guard.score_trajectory(messages=m, tools=t).score for m, t in runs]
        got = client.infer("siren_guard", [
            _text_input(httpclient, "MESSAGES", [json.dumps(m).encode() for m, _ in runs]),
            _text_input(httpclient, "TOOLS", [json.dumps(t).encode() for _, t in runs])]).as_numpy("SCORE")
        assert np.max(np.abs(got.reshape(-1) - np.array(expected))) <= TOL
        assert abs(got.reshape(-1)[0] - agent_qwen[1].score_trajectory(
            __import__("siren_guard").from_openai(runs[0][0], runs[0][1])).score) <= TOL
        # a run appended message by message on siren_stream: each answer is the run so far
        messages = runs[0][0]
        session = guard.session(tools=TOOLS)
        for n, message in enumerate(messages):
            want = session.append(message).score
            inputs = [_text_input(httpclient, "MESSAGES", [json.dumps([message]).encode()])]
            if n == 0:
                inputs.append(_text_input(httpclient, "TOOLS", [json.dumps(TOOLS).encode()]))
            result = client.infer("siren_stream", inputs, sequence_id=500, sequence_start=n == 0,
                                  sequence_end=n == len(messages) - 1)
            assert abs(float(result.as_numpy("SCORE").reshape(-1)[0]) - want) <= TOL
    with pytest.raises(InferenceServerException, match="unknown message role"):
        client.infer("siren_guard", [_text_input(httpclient, "MESSAGES", [b'[{"role": "pirate"}]'])])
    with pytest.raises(InferenceServerException, match="siren_stream"):
        client.infer("siren_stream", [_text_input(httpclient, "MESSAGES", [b'not json'])], sequence_id=501,
                     sequence_start=True, sequence_end=True)

"""What users expect of a server they already know (TEI, vLLM): /v1/models for the openai
client, /version, /info, an OpenAPI document naming every route, an opt-in access log.
In process, over Starlette's test client (the app `siren serve` runs), on a real guard."""
from __future__ import annotations

import logging

import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from siren_runtime import SirenGuard, package_version
from siren_serving.openapi import operations
from siren_serving.server import create_app
from siren_serving.settings import ServeConfig


@pytest.fixture(scope="module")
def client(all_layers):
    guard = SirenGuard.from_pretrained(str(all_layers.bundle), device="cpu")
    app = create_app(guard, ServeConfig(bundle=str(all_layers.bundle), model_name="siren-test", log_requests=True,
                                        max_inputs=17))
    with TestClient(app) as test_client:       # runs the lifespan: batchers start, the guard closes after
        yield test_client


def test_the_openai_client_lists_and_uses_the_model(client, all_layers):
    import openai
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    models = api.models.list().data
    assert [m.id for m in models] == ["siren-test"] and models[0].owned_by == "siren-deploy"
    assert api.models.retrieve("siren-test").id == "siren-test"
    result = api.moderations.create(input="How do I pick a lock?", model="siren-test").results[0]
    assert abs(result.category_scores.harmful - all_layers.reference.score("How do I pick a lock?").score) <= 1e-5
    missing = client.get("/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_version_and_info(client, all_layers):
    assert client.get("/version").json() == {"name": "siren-deploy", "version": package_version()}
    info = client.get("/info").json()
    assert info["kind"] == "content" and info["backend"] == "onnxruntime" and info["device"] == "cpu"
    assert info["dtype"] == "fp32" and info["model"] == "siren-test" and info["incremental_streaming"] is True
    assert info["limits"]["max_inputs"] == 17 and info["limits"]["max_length"] == all_layers.case.max_length
    assert info["limits"]["max_batch_size"] >= 1 and info["limits"]["token_budget"] >= info["limits"]["max_length"]


def test_the_openapi_document_names_every_route(client):
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.") and document["info"]["version"] == package_version()
    served = {(route.path, method.lower()) for route in client.app.routes if isinstance(route, Route)
              for method in route.methods if method not in ("HEAD",)}
    documented = {(path, method) for path, methods in document["paths"].items() for method in methods}
    assert served == documented == set(operations())


def test_log_requests_writes_one_line_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="siren_serving.access"):
        client.post("/v1/moderations", json={"input": "hello"})
        client.post("/v1/moderations", json={"input": 3})
    lines = [r.getMessage() for r in caplog.records if r.name == "siren_serving.access"]
    assert len(lines) == 2
    assert " POST /v1/moderations 200 " in lines[0] and " POST /v1/moderations 400 " in lines[1]
    assert lines[0].endswith(" ms")

"""Agent-SIREN bundles on every path a content bundle has: `siren quantize` and its gate (agent
runs built from the gate texts), `siren verify`, TensorRT engines on the stand-in (profiles for
the trajectory graphs, the step engine's own check appending runs), and `siren bench`'s
trajectory row beside llm-siren's AgentSirenGuard."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from helpers import TOL
from corpus import TOOLS, trajectories


def _runs():
    return [{"messages": m, "tools": t} for m, t in trajectories()]


def test_quantize_gates_and_streams_a_trajectory_bundle(agent_qwen, tmp_path):
    from siren_quantize.gate import verify_quantized
    from siren_quantize.pipeline import quantize_bundle
    from siren_runtime import AgentSirenGuard
    from siren_runtime.bundle import read_bundle
    out, report = quantize_bundle(agent_qwen[0], tmp_path / "int8", show_progress=False)
    contract = read_bundle(out)
    contract.verify()                                          # the chat template is carried and hashed
    assert contract.guard.kind == "trajectory" and contract.manifest["quantization"]["scheme"] == "dynamic"
    assert report["passed"] and report["checked"] and report["texts"] >= 50
    kept = contract.manifest["quantization"]["plan"]
    assert kept and contract.manifest["parity"]["passed"]
    with AgentSirenGuard.from_pretrained(out, device="cpu") as int8, \
            AgentSirenGuard.from_pretrained(agent_qwen[0], device="cpu") as fp32:
        got = np.array([r.score for r in int8.score_batch(_runs())])
        want = np.array([r.score for r in fp32.score_batch(_runs())])
        assert np.mean(np.abs(got - want)) <= 0.02
        session = int8.session(tools=TOOLS)          # the int8 step graph appends a run, as its own whole score
        for end, message in enumerate(trajectories()[0][0], 1):
            appended = session.append(message).score
            whole = int8.score_trajectory(messages=trajectories()[0][0][:end], tools=TOOLS).score
            assert abs(appended - whole) <= 5e-3
    again = verify_quantized(out, agent_qwen[0])                # `siren verify` of an int8 trajectory bundle
    assert again["passed"] and again["texts"] == report["texts"]


def test_verify_an_fp32_trajectory_bundle(agent_qwen):
    from siren_engines.verify import verify_bundle
    report = verify_bundle(agent_qwen[0])
    assert report["passed"] and report["max_abs_diff"] == 0.0 and report["texts"] >= 50


def test_tensorrt_engines_for_a_trajectory_bundle_on_the_stand_in(agent_qwen, tmp_path, trt_standin):
    from siren_engines.build import build_engines
    from siren_runtime import AgentSirenGuard
    from siren_runtime.bundle import read_bundle
    bundle = tmp_path / "bundle"
    shutil.copytree(agent_qwen[0], bundle)
    result = build_engines(bundle, max_batch=4, stream_batch=3, show_progress=False)
    assert result["warnings"] == []
    contract = read_bundle(bundle)
    contract.verify()
    model, step = contract.engines_for("model")[0].record, contract.engines_for("streaming")[0].record
    assert model["verify"]["passed"] and model["verify"]["max_abs_diff"] <= TOL
    assert step["verify"]["passed"] and step["verify"]["texts"] == 8 and step["verify"]["max_abs_diff"] <= TOL
    assert step["profiles"][0]["shapes"]["past_sums"]["max"][1] == 1          # a logit per token, not features
    _, reference = agent_qwen
    from siren_guard import from_openai
    with AgentSirenGuard.from_pretrained(bundle, backend="tensorrt", device="cuda") as guard:
        assert (guard.backend, guard.device, guard.runners.step.name) == ("tensorrt", "cuda", "tensorrt")
        ours = np.array([r.score for r in guard.score_batch(_runs())])
        ref = np.array([reference.score_trajectory(from_openai(r["messages"], r["tools"])).score for r in _runs()])
        assert np.max(np.abs(ours - ref)) <= TOL
        sessions = [guard.session(tools=r["tools"]) for r in _runs()[:4]]
        for round_ in range(3):
            live = [(s, r) for s, r in zip(sessions, _runs()[:4]) if round_ < len(r["messages"])]
            got = guard.feed_batch([s for s, _ in live], [[r["messages"][round_]] for _, r in live])
            for (_, r), result in zip(live, got):
                want = reference.score_trajectory(from_openai(r["messages"][:round_ + 1], r["tools"])).score
                assert abs(result.score - want) <= TOL
    assert trt_standin.gpu.live_bytes() == 0


def test_bench_has_a_trajectory_row_beside_llm_siren(agent_qwen):
    from siren_export.bench import format_table, run_bench
    bundle = agent_qwen[0]
    rows, runs, tokens = run_bench(str(bundle), reference=str(bundle.parent / "head"), repeat=1)
    names = [r["implementation"] for r in rows]
    assert names[0] == "llm-siren AgentSirenGuard (torch)" and names[1].startswith("siren_runtime fp32")
    assert rows[1]["max_dscore"] <= TOL and rows[1]["feed_ms"] is not None and tokens > 0
    assert "12 agent runs" in format_table(rows, runs, tokens)
    with pytest.raises(ValueError, match="--breakdown"):
        run_bench(str(bundle), breakdown=True)

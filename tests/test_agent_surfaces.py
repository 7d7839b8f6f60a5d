"""Agent runs on the batch surfaces: `siren score` reading JSON Lines runs (in a process where
torch and transformers cannot be imported), SirenScorer on messages/tools columns (lists,
JSON strings, numpy cells as Ray Data hands them), each equal to the runtime and llm-siren."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import TOL
from corpus import trajectories
from helpers import BLOCKER

SCRIPT = BLOCKER + "from siren_cli.main import main\nsys.exit(main(sys.argv[1:]))\n"


def siren(*args, stdin=None):
    return subprocess.run([sys.executable, "-c", SCRIPT, *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def runs_file(tmp_path_factory):
    """Every varied run, as lists and as JSON strings, one with its own threshold."""
    path = tmp_path_factory.mktemp("runs") / "runs.jsonl"
    rows = []
    for i, (messages, tools) in enumerate(trajectories()):
        rows.append({"id": f"r{i}", "messages": messages, **({"tools": tools} if tools else {})})
        rows.append({"id": f"s{i}", "messages": json.dumps(messages), "tools": json.dumps(tools), "threshold": 0.1})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path, rows


def expected_scores(agent_qwen, rows):
    from siren_guard import from_openai
    from siren_runtime import AgentSirenGuard
    bundle, reference = agent_qwen
    with AgentSirenGuard.from_pretrained(bundle, device="cpu") as guard:
        runtime = [guard.score_trajectory(messages=_list(r["messages"]), tools=_list(r.get("tools"))).score
                   for r in rows]
    ref = [reference.score_trajectory(from_openai(_list(r["messages"]), _list(r.get("tools")))).score for r in rows]
    return runtime, ref


def _list(value):
    return json.loads(value) if isinstance(value, str) else value


def test_siren_score_reads_agent_runs_torch_free(agent_qwen, runs_file):
    path, rows = runs_file
    runtime, ref = expected_scores(agent_qwen, rows)
    proc = siren("score", agent_qwen[0], "--input", path, "--json")
    assert proc.returncode == 0, proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [o["id"] for o in out] == [r["id"] for r in rows]
    assert max(abs(o["score"] - s) for o, s in zip(out, runtime)) <= TOL
    assert max(abs(o["score"] - s) for o, s in zip(out, ref)) <= TOL
    assert [o["threshold"] for o in out] == [r.get("threshold", 0.5) for r in rows]
    assert [o["is_harmful"] for o in out] == [o["score"] >= o["threshold"] for o in out]
    piped = siren("score", agent_qwen[0], stdin=path.read_text(encoding="utf-8"))     # stdin: JSON Lines too
    assert piped.returncode == 0 and len(piped.stdout.splitlines()) == len(rows)
    for args, says in (((agent_qwen[0], "a text"), "a trajectory bundle scores agent runs"),
                       ((agent_qwen[0], "--input", "-"), "a content record")):
        bad = siren("score", *args, stdin='{"text": "x"}\n')
        assert bad.returncode == 2 and says in bad.stderr


def test_siren_score_names_a_bad_run_by_its_line(agent_qwen, tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps({"messages": [{"role": "user", "content": "ok"}]}) + "\n"
                      + json.dumps({"messages": [{"role": "pirate", "content": "arr"}]}) + "\n")
    proc = siren("score", agent_qwen[0], "--input", source)
    assert proc.returncode == 2 and "line 2: unknown message role 'pirate'" in proc.stderr
    proc = siren("score", agent_qwen[0], "--input", source, "--errors", "skip")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1


def test_siren_scorer_reads_messages_and_tools_columns(agent_qwen, runs_file):
    from siren_ray.scorer import SirenScorer
    _, rows = runs_file
    runtime, ref = expected_scores(agent_qwen, rows)
    scorer = SirenScorer(str(agent_qwen[0]), device="cpu")
    try:
        # as Ray Data hands a batch: numpy object arrays of cells (nested lists, JSON strings, None)
        batch = {"id": np.array([r["id"] for r in rows], dtype=object),
                 "messages": np.array([r["messages"] for r in rows] + [None], dtype=object)[:-1],
                 "tools": np.array([r.get("tools") for r in rows] + [None], dtype=object)[:-1]}
        out = scorer(batch)
        assert max(abs(a - b) for a, b in zip(out["score"], runtime)) <= TOL
        assert max(abs(a - b) for a, b in zip(out["score"], ref)) <= TOL
        with pytest.raises(ValueError, match="row 0: unknown message role"):
            scorer({"messages": [[{"role": "pirate"}]]})
        with pytest.raises(KeyError, match="no column 'messages'"):
            scorer({"text": ["hello"]})
    finally:
        del scorer
    with pytest.raises(ValueError, match="onset is a content guard's"):
        SirenScorer(str(agent_qwen[0]), onset=True)

"""Agent-SIREN trajectory guards: exported from a trajectory artifact, scored torch-free, equal
to llm-siren's AgentSirenGuard (fp32) on the same weights, on tiny random Qwen3 and Llama 3
backbones with realistic chat templates (tests/chat_templates.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import chat_templates
from corpus import trajectories
from helpers import TOL, build_trajectory_bundle
from helpers import BLOCKER

_build = build_trajectory_bundle


@pytest.fixture(scope="module")
def qwen(agent_qwen):
    return agent_qwen


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    # the readout after the last block (no final norm there either)
    return _build(tmp_path_factory.mktemp("agent-llama"), chat_templates.LLAMA3, llama=True, blocks=4, layers=4)


@pytest.fixture(scope="module")
def qwen_guard(qwen):
    from siren_runtime import AgentSirenGuard
    return AgentSirenGuard.from_pretrained(qwen[0], device="cpu")


def _reference_scores(reference, runs):
    from siren_guard import from_openai
    return np.array([reference.score_trajectory(from_openai(m, t)).score for m, t in runs])


def test_whole_batch_and_every_turn_prefix_equal_llm_siren(qwen, qwen_guard):
    _, reference = qwen
    runs = trajectories()
    want = _reference_scores(reference, runs)
    ours = np.array([qwen_guard.score_trajectory(messages=m, tools=t).score for m, t in runs])
    assert np.max(np.abs(ours - want)) <= TOL
    from siren_runtime import from_openai
    batch = np.array([r.score for r in qwen_guard.score_batch([from_openai(m, t) for m, t in runs])])
    assert np.max(np.abs(batch - want)) <= TOL
    assert np.array_equal(batch, ours)                               # batch-invariant, bit for bit
    for messages, tools in runs:                                     # every turn prefix, as an agent loop scores
        for end in range(1, len(messages) + 1):
            got = qwen_guard.score_streaming(messages[:end], tools).score
            ref = reference.score_streaming(messages[:end], tools).score
            assert abs(got - ref) <= TOL, (end, messages[end - 1])


def test_ids_and_render_are_the_references(qwen, qwen_guard):
    _, reference = qwen
    from siren_guard import from_openai
    from siren_guard._render import encode_truncated, render
    for messages, tools in trajectories():
        text = render(reference._tokenizer, from_openai(messages, tools), rich_tools=True)
        assert qwen_guard.render({"messages": messages, "tools": tools}) == text
        ids, truncated = encode_truncated(reference._tokenizer, text, qwen_guard.max_length)
        assert qwen_guard.token_ids({"messages": messages, "tools": tools}) == ids.tolist()
    assert truncated      # the last run is over budget


def test_llama3_template_bos_and_readout_after_the_last_block(llama):
    from siren_guard import from_openai
    from siren_runtime import AgentSirenGuard
    bundle, reference = llama
    guard = AgentSirenGuard.from_pretrained(bundle, device="cpu")
    assert guard.bundle.guard.block == 4 and guard.bundle.guard.norm is False
    runs = trajectories()
    ids = guard.token_ids(from_openai(*runs[2]))
    bos = reference._tokenizer.bos_token_id
    assert ids[:2] == [bos, bos]          # the tokenizer's BOS and the template's, as the reference reads them
    want = _reference_scores(reference, runs)
    ours = np.array([r.score for r in guard.score_batch([from_openai(m, t) for m, t in runs])])
    assert np.max(np.abs(ours - want)) <= TOL


def test_template_without_system_role_folds_it(tmp_path, qwen_tokenizer_json):
    import shutil
    shutil.copy(qwen_tokenizer_json, tmp_path / "qwen3-tokenizer.json")
    from siren_runtime import AgentSirenGuard
    bundle, reference = _build(tmp_path / "n", chat_templates.NO_SYSTEM, layers=2, blocks=2)
    guard = AgentSirenGuard.from_pretrained(bundle, device="cpu")
    runs = [r for r in trajectories() if r[0][0]["role"] in ("system", "user", "developer")][:3]
    want = _reference_scores(reference, runs)
    ours = np.array([guard.score_trajectory(messages=m, tools=t).score for m, t in runs])
    assert np.max(np.abs(ours - want)) <= TOL
    # a conversation the template refuses even folded: a clear ValueError, as the reference raises
    bad = [{"role": "assistant", "content": "I start"}, {"role": "assistant", "content": "twice"},
           {"role": "user", "content": "then you"}]
    with pytest.raises(ValueError, match="chat template refused this trajectory.*alternate"):
        guard.score_trajectory(messages=[bad[0], {"role": "tool", "content": "x"}, bad[0]])
    with pytest.raises(Exception):
        reference.score_trajectory(messages=[bad[0], {"role": "tool", "content": "x"}, bad[0]])


# -- rendering: byte for byte with transformers, on generated message lists -----------------
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": _text})


@pytest.mark.parametrize("name", ["QWEN3", "LLAMA3", "NO_SYSTEM"])
def test_render_equals_transformers_byte_for_byte(name):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    from siren_runtime.chat_template import ChatTemplate, TemplateError
    template = getattr(chat_templates, name)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", unk_token="<unk>")
    tokenizer.chat_template = template
    ours = ChatTemplate(template, tokenizer.special_tokens_map)
    seen = {"equal": 0, "refused": 0}

    @settings(max_examples=220, deadline=None, derandomize=True)
    @given(st.lists(_message, min_size=1, max_size=8))
    def check(messages):
        try:
            want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        except Exception:
            with pytest.raises(TemplateError):
                ours.render(messages)
            seen["refused"] += 1
            return
        assert ours.render(messages) == want
        seen["equal"] += 1
    check()
    assert seen["equal"] >= 200 or (name == "NO_SYSTEM" and seen["equal"] + seen["refused"] >= 200)


# -- the kinds, bad input, torch-free ---------------------------------------------------------
def test_each_guard_refuses_the_other_kind(qwen, all_layers):
    from siren_runtime import AgentSirenGuard, SirenGuard, load_guard
    with pytest.raises(ValueError, match="'trajectory' guard bundle: load it with siren_runtime.AgentSirenGuard"):
        SirenGuard.from_pretrained(qwen[0], device="cpu")
    with pytest.raises(ValueError, match="'content' guard bundle: load it with siren_runtime.SirenGuard"):
        AgentSirenGuard.from_pretrained(all_layers.bundle, device="cpu")
    assert isinstance(load_guard(qwen[0], device="cpu"), AgentSirenGuard)
    assert isinstance(load_guard(all_layers.bundle, device="cpu"), SirenGuard)


def test_bad_input_is_a_clear_error(qwen_guard):
    from siren_runtime import Trajectory, Turn
    cases = [
        ("a bare string", lambda: qwen_guard.score_trajectory("rm -rf /"), TypeError, "not a string"),
        ("unknown role", lambda: qwen_guard.score_trajectory(messages=[{"role": "robot", "content": "x"}]),
         ValueError, "unknown message role 'robot'"),
        ("content type", lambda: qwen_guard.score_trajectory(messages=[{"role": "user", "content": 5}]),
         TypeError, "content must be"),
        ("messages type", lambda: qwen_guard.score_trajectory(messages="hello"), TypeError, "messages must be"),
        ("tools type", lambda: qwen_guard.score_trajectory(messages=[{"role": "user", "content": "x"}], tools={"a": 1}),
         TypeError, "tools must be"),
        ("turn role", lambda: qwen_guard.score_trajectory(Trajectory(turns=[Turn(role="bot")])), ValueError, "role"),
        ("lone surrogate", lambda: qwen_guard.score_trajectory(messages=[{"role": "user", "content": "\ud800"}]),
         ValueError, "surrogate"),
        ("both", lambda: qwen_guard.score_trajectory(Trajectory(), messages=[]), ValueError, "either"),
        ("threshold", lambda: qwen_guard.score_trajectory(messages=[{"role": "user", "content": "x"}], threshold=2),
         ValueError, "threshold"),
    ]
    for name, call, kind, message in cases:
        with pytest.raises(kind, match=message):
            call()
    assert 0.0 <= qwen_guard.score_trajectory(messages=[{"role": "user", "content": "still fine"}]).score <= 1.0


# -- turn by turn: sessions and the drop-in cache run only the new ids -------------------------

def _appended_one_by_one(guard, reference, messages, tools):
    """Append each message to a session; every verdict equals llm-siren's on that prefix, and
    each append ran exactly the ids after the common prefix with what the session held."""
    from siren_runtime.streaming import common_prefix
    session = guard.session(tools=tools)
    previous, ran = (), []
    for end in range(1, len(messages) + 1):
        result = session.append(messages[end - 1])
        want = reference.score_streaming(messages[:end], tools).score
        assert abs(result.score - want) <= TOL, (end, messages[end - 1])
        ids = tuple(guard.token_ids({"messages": messages[:end], "tools": tools}))
        state = session._held.state
        assert state.ids == ids and state.start == min(common_prefix(previous, ids), len(ids) - 1)
        ran.append(len(ids) - state.start)
        previous = ids
    assert session.messages == messages and session.result.score == result.score
    return ran


@pytest.mark.parametrize("backbone", ["qwen", "llama"])
def test_sessions_append_turn_by_turn_equal_llm_siren(backbone, request):
    from siren_runtime import AgentSirenGuard
    bundle, reference = request.getfixturevalue(backbone)
    with AgentSirenGuard.from_pretrained(bundle, device="cpu") as guard:
        assert guard.incremental_streaming
        for index, (messages, tools) in enumerate(trajectories()):
            ran = _appended_one_by_one(guard, reference, messages, tools)
            if index == len(trajectories()) - 1:        # over budget: a turn runs at most the kept tail
                assert max(ran[1:]) <= guard.max_length - guard.max_length // 2


def test_many_sessions_step_together(qwen, qwen_guard):
    _, reference = qwen
    runs = trajectories()
    sessions = [qwen_guard.session(tools=t) for _, t in runs]
    calls = []
    runner = qwen_guard._incremental.runner
    step = runner.step
    runner.step = lambda rows: calls.append(len(rows)) or step(rows)
    try:
        for turn in range(max(len(m) for m, _ in runs)):
            live = [(s, m) for s, (m, _) in zip(sessions, runs) if turn < len(m)]
            results = qwen_guard.feed_batch([s for s, _ in live], [[m[turn]] for _, m in live])
            for (session, messages), result in zip(live, results):
                tools = runs[sessions.index(session)][1]
                assert abs(result.score - reference.score_streaming(messages[:turn + 1], tools).score) <= TOL
    finally:
        runner.step = step
    assert max(calls) > 1          # rows of several runs in one engine call


def test_a_refused_append_changes_nothing(qwen, qwen_guard):
    _, reference = qwen
    messages, tools = trajectories()[0]
    session = qwen_guard.session(tools=tools)
    session.append(*messages[:2])
    before = (session.messages, session.result, session._held.state)
    bad = [("unknown role", ({"role": "robot", "content": "x"},), ValueError, "unknown message role"),
           ("a string", ("hello",), TypeError, "must be"),
           ("content type", ({"role": "user", "content": 5},), TypeError, "content must be"),
           ("lone surrogate", ({"role": "user", "content": "\ud800"},), ValueError, "surrogate")]
    for name, appended, kind, message in bad:
        with pytest.raises(kind, match=message):
            session.append(*appended)
        assert (session.messages, session.result, session._held.state) == before, name
    with pytest.raises(TypeError):
        qwen_guard.feed_batch([session], ["not a list"])
    with pytest.raises(ValueError, match="appears twice"):
        qwen_guard.feed_batch([session, session], [[messages[2]], [messages[2]]])
    assert (session.messages, session.result, session._held.state) == before
    result = session.append(*messages[2:])
    assert abs(result.score - reference.score_streaming(messages, tools).score) <= TOL


def test_the_agent_guard_is_torch_free(qwen):
    from siren_guard import from_openai
    _, reference = qwen
    messages, tools = trajectories()[0]
    want = reference.score_trajectory(from_openai(messages, tools)).score
    script = BLOCKER + (
        "import json\nfrom siren_runtime import load_guard\n"
        f"guard = load_guard({str(qwen[0])!r}, device='cpu')\n"
        f"run = json.loads({json.dumps(json.dumps({'messages': messages, 'tools': tools}))})\n"
        "print(guard(messages=run['messages'], tools=run['tools']).score)\n"
        "session = guard.session(tools=run['tools'])\n"
        "print(session.append(*run['messages']).score, guard.incremental_streaming)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    whole, (streamed, incremental) = out.stdout.strip().splitlines()[-2:][0], out.stdout.strip().splitlines()[-1].split()
    assert abs(float(whole) - want) <= TOL and abs(float(streamed) - want) <= TOL and incremental == "True"


def test_export_refuses_other_contracts_by_name(tmp_path, qwen):
    import shutil
    from siren_export.errors import ArtifactError
    from siren_export.trajectory import load_trajectory_artifact
    head = tmp_path / "head"
    source = json.loads((qwen[0] / "siren_bundle.json").read_text())["source"]["artifact"]
    shutil.copytree(source, head)
    config = json.loads((head / "siren_config.json").read_text())
    for field, value, message in ((("siren_module", "pooling_type"), "mean", "pooling_type 'mean' is not supported"),
                                  (("render", "tools"), "names", "unsupported rendering contract 'names'"),
                                  (("render", "truncation"), "right", "'rich'/'right'")):
        changed = json.loads(json.dumps(config))
        changed[field[0]][field[1]] = value
        (head / "siren_config.json").write_text(json.dumps(changed))
        with pytest.raises(ArtifactError, match=message):
            load_trajectory_artifact(str(head))

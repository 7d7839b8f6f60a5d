"""LiteLLM's Generic Guardrail API, so a SIREN guard plugs into the LiteLLM proxy with a few
lines of config (`guardrail: generic_guardrail_api`, `api_base: http://siren:8000`).

    POST /beta/litellm_basic_guardrail_api
        {"input_type": "request" | "response", "texts"?, "structured_messages"?, "tools"?,
         "tool_calls"?, "litellm_call_id"?, "litellm_trace_id"?, "additional_provider_specific_params"?}
    ->  {"action": "NONE" | "BLOCKED" | "GUARDRAIL_INTERVENED", "blocked_reason", "texts"?, "siren": [...]}

`texts` go to the content guard: a request's texts as prompts, a response's texts as responses
to the last user message of `structured_messages` (SIREN's response form). A trajectory guard,
when one is loaded, judges the agent run: a request's `structured_messages` (and `tools`), and
a response's proposed `tool_calls` appended as the agent's next turn, so a tool call is judged
before it runs. A flagged input is BLOCKED with a reason naming the guard, score and threshold;
with `intervene` a flagged response whose harm onset is found is cut there instead
(GUARDRAIL_INTERVENED).

LiteLLM sends its ids when it calls with its logging object (the proxy does). With a
`litellm_call_id`, the checks of one streamed response (the text so far, every few chunks)
feed one stream session: each check runs only the text added since the last one. With a
`litellm_trace_id` (else the call id), the checks of one agent run append to one trajectory
session: each runs only the new turns. Without ids every call is scored whole.

additional_provider_specific_params: `content_guard` / `trajectory_guard` (names, when several
of a kind are loaded), `threshold`, `intervene` (default false), `sustain` (tokens, for the
onset). Other keys are left to other guardrails.
"""
from __future__ import annotations

from typing import Any, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from siren_runtime.text import join_prompt_response
from siren_runtime.trajectory import from_openai

from ..api import ApiError, parse_int, parse_threshold
from ..http import check_texts, endpoint
from ..openapi import MESSAGES, NUMBER01, TOOLS, request_body, response
from ..runs import parse_messages, parse_tools, run_of
from ..sessions import SessionRegistry, UnknownSessionError

PATH = "/beta/litellm_basic_guardrail_api"
INPUT_TYPES = ("request", "response")
_ID_FIELDS = ("litellm_call_id", "litellm_trace_id")


def litellm_error(error: ApiError) -> tuple[dict, int]:
    """LiteLLM reads an error's status (a 4xx blocks or passes by its fail_on_error); the body
    says what was wrong, as FastAPI's `detail`, which LiteLLM's own guardrail servers send."""
    return {"detail": error.message, "param": error.param}, error.status


class Check:
    """One LiteLLM call, parsed: every field checked before anything is scored."""

    def __init__(self, body: dict, max_inputs: int):
        self.input_type = body.get("input_type")
        if self.input_type not in INPUT_TYPES:
            raise ApiError(400, f"input_type must be 'request' or 'response', got {self.input_type!r}",
                           param="input_type")
        texts = body.get("texts")
        if texts is None:
            texts = []
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "texts must be a list of strings", param="texts")
        if len(texts) > max_inputs:
            raise ApiError(413, f"texts has {len(texts)} items; this server takes at most {max_inputs}",
                           param="texts", code="too_many_inputs")
        check_texts(texts, "texts")
        self.texts = texts
        messages = body.get("structured_messages")
        self.messages = None if messages is None else parse_messages(messages, "structured_messages")
        self.tools = parse_tools(body.get("tools"), "tools")
        if self.messages is not None:
            run_of(self.messages, self.tools, "structured_messages")       # every role and content, or a 400
        calls = body.get("tool_calls")
        if calls is not None and (not isinstance(calls, list) or not all(isinstance(c, dict) for c in calls)):
            raise ApiError(400, "tool_calls must be a list of tool call objects", param="tool_calls")
        self.tool_calls = parse_messages(calls, "tool_calls") if calls else None
        for name in _ID_FIELDS:
            value = body.get(name)
            if value is not None and (not isinstance(value, str) or len(value) > 256):
                raise ApiError(400, f"{name} must be a string of at most 256 characters", param=name)
        self.call_id, self.trace_id = body.get("litellm_call_id"), body.get("litellm_trace_id")
        params = body.get("additional_provider_specific_params") or {}
        if not isinstance(params, dict):
            raise ApiError(400, "additional_provider_specific_params must be an object",
                           param="additional_provider_specific_params")
        self.params = params
        for name in ("content_guard", "trajectory_guard"):
            if params.get(name) is not None and not isinstance(params[name], str):
                raise ApiError(400, f"{name} must be a guard's name (a string)", param=name)
        self.intervene = params.get("intervene", False)
        if not isinstance(self.intervene, bool):
            raise ApiError(400, f"intervene must be true or false, got {self.intervene!r}", param="intervene")
        self.sustain = parse_int(params.get("sustain", 1), "sustain", high=1_000_000)

    @property
    def wants_trajectory(self) -> bool:
        """A request carrying the run, or a response proposing tool calls."""
        if self.input_type == "response":
            return bool(self.tool_calls)
        return bool(self.messages or self.tools or self.tool_calls)

    def run_messages(self) -> list:
        """The run as the trajectory guard reads it: the messages, then any proposed calls as
        the agent's next turn (with the response's text as its thought)."""
        messages = list(self.messages or [])
        if self.tool_calls:
            text = "\n".join(self.texts) if self.input_type == "response" else ""
            messages.append({"role": "assistant", "content": text or None, "tool_calls": self.tool_calls})
        return messages

    def prompt(self) -> Optional[str]:
        """A response's prompt: the last user message's text (None without messages)."""
        for message in reversed(self.messages or []):
            if message.get("role") == "user":
                return from_openai([message]).turns[0].content
        return None


class Verdict:
    """One guard's answer on one input (`index`: the text's, None for the agent run)."""

    def __init__(self, guard: str, kind: str, index: Optional[int], score: float, threshold: float,
                 cut: Optional[int] = None):
        self.guard, self.kind, self.index = guard, kind, index
        self.score, self.threshold, self.cut = score, threshold, cut
        self.what = "the agent run" if index is None else f"texts[{index}]"

    @property
    def flagged(self) -> bool:
        return self.score >= self.threshold

    def row(self) -> dict:
        return {"guard": self.guard, "kind": self.kind, "input": self.what, "score": self.score,
                "threshold": self.threshold, "flagged": self.flagged}

    def reason(self) -> str:
        return (f"SIREN {self.kind} guard {self.guard!r} scored {self.what} {self.score:.4f} >= threshold "
                f"{self.threshold:g}")


class KeyedSessions:
    """Sessions of one guard keyed by a LiteLLM id. A call runs on the held session when its
    input extends what that session holds, else on a fresh one; a fresh session is kept under
    the id only after its call succeeded, so a refused call changes no keyed session (and
    evicts none). The service sweeps these with its own sessions and frees them at shutdown."""

    def __init__(self, service, config, prefix: str):
        self.service = service
        self.registry = SessionRegistry(service.guard, config.max_sessions, config.session_ttl_s, prefix=prefix)
        service.keyed.append(self.registry)

    async def run(self, key: str, extends, advance):
        """advance(session or None) -> (the session to keep, the answer); None: a fresh one."""
        while True:
            try:
                held = self.registry.get(key)
            except UnknownSessionError:
                session, answer = await advance(None)
                self.registry.adopt(key, session)
                return answer
            async with held.lock:
                if held.closed:              # dropped (TTL, room made) while this call waited: look again
                    continue
                session, answer = await advance(held.session if extends(held.session) else None)
                if session is not held.session:      # another run under this id: the old one is freed
                    old, held.session = held.session, session
                    old.reset()
                self.registry.touch(held)
                return answer


class KeyedRuns(KeyedSessions):
    """Trajectory sessions keyed by a trace (or call) id: a call whose run extends the held one
    (the same profile, tools and turns so far, as the guard reads them) appends only the new
    messages."""

    def __init__(self, service, config):
        super().__init__(service, config, "litellm-traj-")

    async def score(self, key: str, messages: list, tools: Optional[list], threshold: float) -> float:
        guard = self.service.guard

        def extends(session) -> bool:
            known = session.messages
            return (session.tools == tools and session.threshold == threshold and len(known) <= len(messages)
                    and from_openai(known, tools) == from_openai(messages[:len(known)], tools))

        async def advance(session):
            if session is not None and len(session.messages) == len(messages) and session.result is not None:
                return session, session.result.score
            target = session if session is not None else guard.session(tools=tools, threshold=threshold)
            result = await self.service.append_to(target, messages[len(target.messages):])
            return target, result.score
        return await self.run(key, extends, advance)


class KeyedTexts(KeyedSessions):
    """Text streams keyed by (call id, text index): each check of a streamed response feeds
    only what the text gained since the last check."""

    def __init__(self, service, config):
        super().__init__(service, config, "litellm-text-")

    async def score(self, key: str, text: str, threshold: float) -> tuple:
        """-> (score, onset: where the running score first reached the threshold, or None)."""
        guard = self.service.guard

        def extends(session) -> bool:
            return session.threshold == threshold and text.startswith(session.text)

        async def advance(session):
            if session is not None and text == session.text and session.score is not None:
                return session, (session.score.score, session.onset)
            target = session if session is not None else guard.stream(threshold=threshold, keep_text=True)
            result, _, onset = await self.service.feed_session(target, text[len(target.text):])
            return target, (result.score, onset)
        return await self.run(key, extends, advance)


def routes(served) -> list:
    config = served.config
    runs = {s.name: KeyedRuns(s, config) for s in served.of_kind("trajectory")}
    texts = {s.name: KeyedTexts(s, config) for s in served.of_kind("content")}

    async def content_verdicts(check: Check, service) -> list:
        threshold = parse_threshold(check.params, service.threshold)
        prompt = check.prompt() if check.input_type == "response" else None
        joined = [join_prompt_response(prompt, t) if check.input_type == "response" else t for t in check.texts]
        offset = len(prompt) + 1 if prompt else 0       # where a response starts in its joined text
        verdicts = []
        def cut(onset):
            """The response's own offset where harm starts; None when it starts in the prompt
            (nothing of the response to keep: BLOCKED, not an empty text)."""
            return None if onset is None or onset <= offset else onset - offset

        cuts = [None] * len(joined)
        if check.call_id and check.input_type == "response":
            scores = []
            for i, text in enumerate(joined):
                score, onset = await texts[service.name].score(f"{check.call_id}/{i}", text, threshold)
                scores.append(score)
                cuts[i] = cut(onset) if check.sustain == 1 else None     # the stream's first crossing
        else:
            scores, _ = await service.scores(joined)
        flagged = [i for i, s in enumerate(scores) if s >= threshold]
        late = [i for i in flagged if cuts[i] is None]
        if check.intervene and check.input_type == "response" and late and service.guard.prefix_scores_available:
            found = await service.prefix_scores([joined[i] for i in late])
            for i, prefixes in zip(late, found):
                cuts[i] = cut(prefixes.onset(threshold, check.sustain))
        verdicts = [Verdict(service.name, "content", i, s, threshold, cuts[i]) for i, s in enumerate(scores)]
        service.observe([v.score for v in verdicts], threshold)
        return verdicts

    async def trajectory_verdict(check: Check, service) -> Verdict:
        threshold = parse_threshold(check.params, service.threshold)
        messages = check.run_messages()
        run = run_of(messages, check.tools, "structured_messages")       # every refusal before any state
        key = check.trace_id or check.call_id
        if key:
            score = await runs[service.name].score(key, messages, check.tools, threshold)
        else:
            [score], _ = await service.scores([run])
        service.observe([score], threshold)
        return Verdict(service.name, "trajectory", None, score, threshold)

    @endpoint(served, "litellm", shape=litellm_error)
    async def guardrail(request: Request) -> Response:
        check = Check(await served.read_json(request), config.max_inputs)
        has_content, has_runs = bool(served.of_kind("content")), bool(served.of_kind("trajectory"))
        # each part goes to the guard of its kind where one is loaded (or is named: then a 4xx
        # says it is not); a call no loaded guard applies to is NONE, so a trajectory-only
        # server does not block every plain reply
        use_content = bool(check.texts) and (has_content or check.params.get("content_guard") is not None)
        use_runs = check.wants_trajectory and (has_runs or check.params.get("trajectory_guard") is not None)
        # every name and threshold checked before anything is scored
        content = served.pick("content", check.params.get("content_guard"), "content_guard") if use_content else None
        agent = (served.pick("trajectory", check.params.get("trajectory_guard"), "trajectory_guard")
                 if use_runs else None)
        for service in (content, agent):
            if service is not None:
                parse_threshold(check.params, service.threshold)
        verdicts = []
        if agent is not None:      # first: its render may refuse the run, and nothing has changed yet
            verdicts.append(await trajectory_verdict(check, agent))
        if content is not None:
            verdicts = await content_verdicts(check, content) + verdicts
        flagged = [v for v in verdicts if v.flagged]
        answer: dict[str, Any] = {"action": "NONE", "blocked_reason": None, "siren": [v.row() for v in verdicts]}
        cuttable = (check.intervene and check.input_type == "response" and flagged
                    and all(v.kind == "content" and v.cut is not None for v in flagged))
        if cuttable:
            cut = list(check.texts)
            for v in flagged:
                cut[v.index] = cut[v.index][:v.cut]
            answer.update(action="GUARDRAIL_INTERVENED", texts=cut)
        elif flagged:
            answer.update(action="BLOCKED", blocked_reason="; ".join(v.reason() for v in flagged))
        return JSONResponse(answer)

    return [Route(PATH, guardrail, methods=["POST"])]


#: this protocol's operations in the OpenAPI document (serving/openapi.py collects them)
OPERATIONS = {
    ("/beta/litellm_basic_guardrail_api", "post"): {
        "tags": ["LiteLLM"], "summary": "LiteLLM's Generic Guardrail API: texts to the content guard, the agent run "
                                        "and proposed tool calls to the trajectory guard",
        "requestBody": request_body({"type": "object", "required": ["input_type"], "properties": {
            "input_type": {"enum": ["request", "response"]}, "texts": {"type": "array", "items": {"type": "string"}},
            "structured_messages": MESSAGES, "tools": TOOLS,
            "tool_calls": {"type": "array", "items": {"type": "object"}},
            "litellm_call_id": {"type": "string", "description": "one streamed response: checks feed one stream"},
            "litellm_trace_id": {"type": "string", "description": "one agent run: checks append to one session"},
            "additional_provider_specific_params": {"type": "object", "properties": {
                "content_guard": {"type": "string"}, "trajectory_guard": {"type": "string"},
                "threshold": NUMBER01, "intervene": {"type": "boolean"},
                "sustain": {"type": "integer", "minimum": 1}}}}}),
        "responses": {"200": response({"type": "object", "properties": {
            "action": {"enum": ["NONE", "BLOCKED", "GUARDRAIL_INTERVENED"]},
            "blocked_reason": {"type": ["string", "null"]}, "texts": {"type": "array", "items": {"type": "string"}},
            "siren": {"type": "array", "items": {"type": "object"}}}}),
            "4XX": response({"type": "object", "properties": {"detail": {"type": "string"}}}, "bad input")}},
}


__all__ = ["routes", "OPERATIONS", "PATH", "Check"]

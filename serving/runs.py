"""Agent runs as requests carry them: OpenAI chat `messages` and `tools` -> a Trajectory, every
refusal a 400 naming the field. The trajectory routes, the detector API's chat route and the
LiteLLM route all read runs through here, so a run is refused alike wherever it is sent."""
from __future__ import annotations

from typing import Any, Optional

from siren_runtime.trajectory import Trajectory, from_openai
from siren_runtime.validation import check_strings

from .api import ApiError, check_count


def _check_strings(value: Any, where: str) -> None:
    """No lone surrogate anywhere in a run (a 400 naming the place)."""
    try:
        check_strings(value, where)
    except ValueError as e:
        raise ApiError(400, str(e), param=where) from None


def parse_messages(value: Any, param: str = "messages") -> list:
    if not isinstance(value, list):
        raise ApiError(400, f"{param} must be a list of chat messages (objects with a role), got "
                            f"{type(value).__name__}", param=param)
    _check_strings(value, param)
    return value


def parse_tools(value: Any, param: str = "tools") -> Optional[list]:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ApiError(400, f"{param} must be a list of tool schemas (objects), got {type(value).__name__}",
                       param=param)
    _check_strings(value, param)
    return value


def run_of(messages: Any, tools: Any, param: str = "messages", tools_param: str = "tools") -> Trajectory:
    """A Trajectory from a request's messages and tools; what the runtime refuses is a 400."""
    messages, tools = parse_messages(messages, param), parse_tools(tools, tools_param)
    try:
        return from_openai(messages, tools)
    except (TypeError, ValueError) as e:
        raise ApiError(400, f"{param}: {e}", param=param, code="invalid_input") from None


def runs_of(body: Any, max_inputs: int) -> tuple[list, bool]:
    """One run ({"messages", "tools"?}) or many (a list of those, or {"trajectories": [...]})
    -> (trajectories, many)."""
    if isinstance(body, dict) and "trajectories" in body:
        items, param = body["trajectories"], "trajectories"
    elif isinstance(body, list):
        items, param = body, "body"
    else:
        if "messages" not in body:
            raise ApiError(400, "missing required field 'messages' (or 'trajectories': a list of runs)",
                           param="messages")
        return [run_of(body.get("messages"), body.get("tools"))], False
    if not isinstance(items, list):
        raise ApiError(400, f"{param} must be a non-empty list of runs ({{\"messages\", \"tools\"}})", param=param)
    check_count(items, max_inputs, param, "runs", empty="empty: it must be a non-empty list of runs")
    runs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "messages" not in item:
            raise ApiError(400, f"{param}[{i}] must be an object with messages (and tools)", param=f"{param}[{i}]")
        runs.append(run_of(item["messages"], item.get("tools"), f"{param}[{i}].messages", f"{param}[{i}].tools"))
    return runs, True


__all__ = ["parse_messages", "parse_tools", "run_of", "runs_of"]

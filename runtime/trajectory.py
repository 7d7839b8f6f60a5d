"""Agent trajectories: what a trajectory guard scores, and the adapter from tool-calling
chat messages (llm-siren's ``Trajectory``, ``Turn`` and ``from_openai``, same names, fields
and refusals).

A trajectory is the system profile, the tool schemas the agent was given, and its turns:
user messages, the agent's thoughts and tool calls, and the tool outputs handed back. Tool
schemas belong in it: an injection hidden in a tool description is part of what the head
reads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

#: a turn's roles
ROLES = ("user", "agent", "environment")


@dataclass
class Turn:
    """One step: role "user" (content), "agent" (thought and action, the tool call as a
    string; or content) or "environment" (content: a tool's output)."""
    role: str
    content: Optional[str] = None
    thought: Optional[str] = None
    action: Optional[str] = None
    tool_name: Optional[str] = None


@dataclass
class Trajectory:
    """One agent run: its turns, the profile (system text) and the tool schemas."""
    turns: list = field(default_factory=list)
    profile: str = ""
    tools: list = field(default_factory=list)


def _flat_tool(tool: Any, where: str) -> dict:
    """An OpenAI function-tool wrapper ({"type": "function", "function": {...}}) or a flat schema."""
    if not isinstance(tool, dict):
        raise TypeError(f"{where} must be a tool schema (an object), got {type(tool).__name__}")
    inner = tool.get("function")
    return dict(inner) if isinstance(inner, dict) else dict(tool)


def _call_action(name: Optional[str], arguments: Any) -> str:
    """A tool call as the training data wrote it: {"name", "arguments"} JSON, arguments
    parsed when they are a JSON string and kept as the string otherwise."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def _text(content: Any, where: str) -> str:
    """A message's content: a string, None, or a list of content parts whose text parts are kept."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text", "") for part in content
                         if isinstance(part, dict) and part.get("type") == "text")
    raise TypeError(f"{where}.content must be a string, a list of content parts or null, "
                    f"got {type(content).__name__}")


def from_openai(messages: Any, tools: Any = None) -> Trajectory:
    """A Trajectory from OpenAI-style chat ``messages`` and the ``tools`` the agent had:
    system/developer -> profile; user -> user turn; an assistant with ``tool_calls`` -> one
    agent turn per call (its text is the first call's thought); without calls -> an agent
    turn with its content; tool/function/environment -> an environment turn. Any other role
    is a ValueError."""
    if isinstance(messages, (str, bytes)) or (messages is not None and not isinstance(messages, (list, tuple))):
        raise TypeError(f"messages must be a list of chat messages, got {type(messages).__name__}")
    if tools is not None and (isinstance(tools, (str, bytes, dict)) or not isinstance(tools, (list, tuple))):
        raise TypeError(f"tools must be a list of tool schemas, got {type(tools).__name__}")
    profile, turns = [], []
    for i, message in enumerate(messages or []):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise TypeError(f"{where} must be an object with a role, got {type(message).__name__}")
        role = message.get("role")
        content = _text(message.get("content"), where)
        if role in ("system", "developer"):
            if content.strip():
                profile.append(content.strip())
        elif role == "user":
            turns.append(Turn(role="user", content=content))
        elif role == "assistant":
            calls = message.get("tool_calls") or []
            if not isinstance(calls, (list, tuple)):
                raise TypeError(f"{where}.tool_calls must be a list, got {type(calls).__name__}")
            if not calls:
                turns.append(Turn(role="agent", content=content))
            for k, call in enumerate(calls):
                function = call.get("function", call) if isinstance(call, dict) else {}
                if not isinstance(function, dict):
                    raise TypeError(f"{where}.tool_calls[{k}].function must be an object")
                name = function.get("name")
                turns.append(Turn(role="agent", tool_name=name, action=_call_action(name, function.get("arguments")),
                                  thought=content if k == 0 and content else None))
        elif role in ("tool", "function", "environment"):
            turns.append(Turn(role="environment", content=content))
        else:
            raise ValueError(f"unknown message role {role!r} in {where}")
    return Trajectory(turns=turns, profile="\n\n".join(profile),
                      tools=[_flat_tool(t, f"tools[{i}]") for i, t in enumerate(tools or [])])


def as_trajectory(obj: Any) -> Trajectory:
    """A Trajectory, a {"messages", "tools"} object or a list of messages; a bare string is
    refused on purpose: the head was fitted on rendered trajectories only (score free text
    with a content guard)."""
    if isinstance(obj, Trajectory):
        return obj
    if isinstance(obj, (str, bytes)):
        raise TypeError("Agent-SIREN scores a trajectory, not a string: pass messages=[...] (and tools=[...]) or "
                        "a Trajectory; score free text with a content guard (SirenGuard)")
    if isinstance(obj, dict) and "messages" in obj:
        return from_openai(obj["messages"], obj.get("tools"))
    if isinstance(obj, (list, tuple)):
        return from_openai(list(obj), None)
    if all(hasattr(obj, name) for name in ("turns", "profile", "tools")):     # llm-siren's own Trajectory
        turns = []
        for turn in obj.turns:
            if not all(hasattr(turn, name) for name in ("role", "content", "thought", "action", "tool_name")):
                raise TypeError(f"cannot read a turn from {type(turn).__name__}")
            turns.append(Turn(role=turn.role, content=turn.content, thought=turn.thought, action=turn.action,
                              tool_name=turn.tool_name))
        return Trajectory(turns=turns, profile=obj.profile, tools=list(obj.tools))
    raise TypeError(f"cannot read a trajectory from {type(obj).__name__}")


def check_trajectory(trajectory: Trajectory) -> None:
    """Refuse what the renderer cannot render (wrong types, unknown roles) with the field's name."""
    if not isinstance(trajectory.profile, str):
        raise TypeError(f"Trajectory.profile must be a string, got {type(trajectory.profile).__name__}")
    if not isinstance(trajectory.tools, (list, tuple)) or not all(isinstance(t, dict) for t in trajectory.tools):
        raise TypeError("Trajectory.tools must be a list of tool schemas (objects)")
    if not isinstance(trajectory.turns, (list, tuple)):
        raise TypeError(f"Trajectory.turns must be a list, got {type(trajectory.turns).__name__}")
    for i, turn in enumerate(trajectory.turns):
        if not isinstance(turn, Turn):
            raise TypeError(f"Trajectory.turns[{i}] must be a Turn, got {type(turn).__name__}")
        if turn.role not in ROLES:
            raise ValueError(f"Trajectory.turns[{i}].role must be one of {', '.join(ROLES)}, got {turn.role!r}")
        for name in ("content", "thought", "action"):
            value = getattr(turn, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"Trajectory.turns[{i}].{name} must be a string or None, got {type(value).__name__}")


__all__ = ["Turn", "Trajectory", "from_openai", "as_trajectory", "check_trajectory", "ROLES"]

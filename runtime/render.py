"""A trajectory as the chat messages the trajectory head was fitted on (llm-siren's
``trace_to_messages`` with rich tools, then its fold-system retry).

Unlike a content guard, nothing here is cleaned: the chat markers, roles and tool schemas
are the signal. The messages go through the backbone's own chat template
(:mod:`siren_runtime.chat_template`).
"""
from __future__ import annotations

from .trajectory import Trajectory


def tools_block(tools: list) -> str:
    """The rich tools block: each tool's description and every parameter's type, non-null
    default and description."""
    lines = ["# Available tools"]
    for tool in tools:
        head = f"- {tool.get('name', '?')}: {(tool.get('description', '') or '').strip()}"
        prototype = tool.get("prototype", "")
        if prototype:
            head += f"\n  signature: {prototype}"
        params = tool.get("parameters", {})
        flat = {}
        if isinstance(params, dict):
            flat = params["properties"] if isinstance(params.get("properties"), dict) else params
        described = []
        for name, spec in flat.items():
            if not isinstance(spec, dict):
                continue
            bits = [spec["type"]] if spec.get("type", "") else []
            if spec.get("default") is not None:
                bits.append(f"default {spec['default']!r}")
            text = (spec.get("description") or "").strip()
            described.append(f"  - {name}" + (f" ({', '.join(bits)})" if bits else "") + (f": {text}" if text else ""))
        if described:
            head += "\n  parameters:\n" + "\n".join(described)
        lines.append(head)
    return "\n".join(lines)


def messages_of(trajectory: Trajectory) -> list:
    """The role/content messages: profile and tools as the system message, agent turns as
    Thought/Action lines (or their content), observations as user messages, same-role runs
    merged (the system message never)."""
    messages = []
    system = []
    if (trajectory.profile or "").strip():
        system.append(trajectory.profile.strip())
    if trajectory.tools:
        system.append(tools_block(trajectory.tools))
    if system:
        messages.append({"role": "system", "content": "\n\n".join(system)})
    for turn in trajectory.turns:
        if turn.role == "user":
            messages.append({"role": "user", "content": turn.content or ""})
        elif turn.role == "agent":
            parts = ([f"Thought: {turn.thought.strip()}"] if turn.thought else []) + \
                    ([f"Action: {turn.action.strip()}"] if turn.action else [])
            messages.append({"role": "assistant", "content": "\n".join(parts) if parts else (turn.content or "")})
        elif turn.role == "environment":
            messages.append({"role": "user", "content": f"[Observation] {turn.content or ''}"})
    merged = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"] and message["role"] != "system":
            merged[-1]["content"] = (merged[-1]["content"] + "\n" + message["content"]).strip()
        else:
            merged.append(dict(message))
    return merged


def fold_system(messages: list) -> list:
    """The system message folded into the first user turn (templates without a system role)."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, out, folded = messages[0]["content"], [], False
    for message in messages[1:]:
        if not folded and message["role"] == "user":
            out.append({"role": "user", "content": system + "\n\n" + message["content"]})
            folded = True
        else:
            out.append(dict(message))
    return out if folded else [{"role": "user", "content": system}] + out


__all__ = ["tools_block", "messages_of", "fold_system"]

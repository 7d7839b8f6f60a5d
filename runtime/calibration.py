"""The calibration texts shipped with the runtime: varied lengths and content, used by the
export self-check and the `siren verify` parity gate (one place reads the file), and the
agent runs built from them for trajectory guards (int8 calibration, the gates)."""
from __future__ import annotations

import json
from importlib import resources

#: the tools of the agent runs built from texts: a schema with types, defaults and descriptions
RUN_TOOLS = [
    {"type": "function", "function": {
        "name": "run_shell", "description": "Run a shell command in the workspace and return its output.",
        "parameters": {"type": "object", "properties": {
            "cmd": {"type": "string", "description": "The command line."},
            "timeout": {"type": "integer", "default": 60, "description": "Seconds before it is stopped."}}}}},
    {"type": "function", "function": {
        "name": "send_message", "description": "Send a message to a contact.",
        "parameters": {"type": "object", "properties": {"to": {"type": "string"}, "body": {"type": "string"}}}}},
]


def calibration_texts() -> list[str]:
    """One text per line of data/calibration.txt, with `\\n` escapes turned into newlines."""
    raw = (resources.files("siren_runtime") / "data" / "calibration.txt").read_text(encoding="utf-8")
    return [line.replace("\\n", "\n") for line in raw.splitlines() if line.strip()]


def agent_runs(texts: list) -> list:
    """One agent run per text ({"messages", "tools"}): a user asks with the text, the agent
    answers or calls a tool on it, the tool answers; varied shapes (a thought, several calls,
    a second user turn) so a trajectory guard's graphs see what agent traffic looks like."""
    runs = []
    for i, text in enumerate(texts):
        messages = [{"role": "system", "content": "You are an assistant that can use tools."},
                    {"role": "user", "content": text}]
        if i % 3 == 0:
            messages.append({"role": "assistant", "content": "I will answer directly. " + text[:120]})
        else:
            call = {"type": "function", "function": {
                "name": "run_shell" if i % 3 == 1 else "send_message",
                "arguments": json.dumps({"cmd": text[:200]} if i % 3 == 1 else {"to": "someone", "body": text[:200]})}}
            messages.append({"role": "assistant", "content": "Let me do that." if i % 2 else None, "tool_calls": [call]})
            messages.append({"role": "tool", "content": "done" if i % 4 else text[-120:]})
            if i % 5 == 0:
                messages.append({"role": "user", "content": "Now do it again, faster."})
        runs.append({"messages": messages, "tools": RUN_TOOLS})
    return runs


def calibration_items(kind: str) -> list:
    """What a guard of `kind` is calibrated on: the texts, or the agent runs built from them."""
    texts = calibration_texts()
    return agent_runs(texts) if kind == "trajectory" else texts

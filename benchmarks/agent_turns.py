"""A 48-turn agent loop scored turn by turn: what Agent-SIREN streaming costs.

    python benchmarks/agent_turns.py [--sizes tiny mid] [--turns 48] [--workdir DIR]

For each size (benchmarks/_models.py's dimensions, a trajectory head reading block
layers-1, Qwen3's chat template from tests/chat_templates.py), on the same weights:
- siren_runtime, a session appending each message (`TrajectorySession.append`): total time
  and the ids the engine ran, against one whole score of the final trajectory;
- the verdict on a newly proposed tool call (`score_streaming` of the run + the call):
  the ids it ran and its time;
- llm-siren (`AgentSirenGuard.score_streaming`, which rescores the whole run each turn);
- over budget (max_length 1024, the same loop): the most ids one append ran (the bound is
  max_length / 2).
Prints a Markdown table with the CPU's ISA. Not a test: a table the developer reads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))       # chat_templates: test data, the real Qwen3 template
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file from the workspace.",
    "parameters": {"type": "object", "properties": {
        "path": {"type": "string", "description": "Path relative to the workspace."},
        "limit": {"type": "integer", "default": 200, "description": "Most lines to return."}}}}},
    {"type": "function", "function": {
        "name": "run_shell", "description": "Run a shell command and return its output.",
        "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}}]


def agent_loop(turns: int) -> list:
    """A coding agent's run: a task, then `turns` rounds of thought + tool call + tool output
    (about 80 tokens a round)."""
    messages = [{"role": "system", "content": "You are a careful coding agent working in a sandboxed repository."},
                {"role": "user", "content": "The test suite fails on main. Find out why and fix it."}]
    for n in range(turns // 2):
        path = f"src/module_{n}.py"
        messages.append({"role": "assistant", "content": f"Let me look at {path} to see how it handles the input.",
                         "tool_calls": [{"type": "function", "function": {
                             "name": "read_file", "arguments": json.dumps({"path": path, "limit": 40})}}]})
        messages.append({"role": "tool", "content": f"def handle_{n}(value):\n    if value is None:\n        return "
                                                    f"{n}\n    return value * {n} + len(str(value))\n"})
        messages.append({"role": "assistant", "content": f"Now run the tests for module {n}.",
                         "tool_calls": [{"type": "function", "function": {
                             "name": "run_shell", "arguments": json.dumps({"cmd": f"pytest tests/test_{n}.py -q"})}}]})
        messages.append({"role": "tool", "content": f"{n % 7 + 3} passed, {n % 2} failed in 0.{n:02d}s"})
    return messages


PROPOSED = {"role": "assistant", "content": "The fix is ready; push it.",
            "tool_calls": [{"type": "function", "function": {"name": "run_shell",
                                                             "arguments": json.dumps({"cmd": "git push --force"})}}]}


def build(size: str, workdir: Path, max_length: int):
    import chat_templates
    from _models import SIZES
    from siren_export.pipeline import export_bundle
    from siren_export.synthetic import make_backbone, make_trajectory_head, set_chat_template
    dims = SIZES[size]
    root = workdir / f"agent-{size}"
    backbone = root / "backbone"
    if not (backbone / "config.json").is_file():
        make_backbone(backbone, **dims)
        set_chat_template(backbone, chat_templates.QWEN3)
    artifact = root / f"head-{max_length}"
    if not (artifact / "siren_config.json").is_file():
        make_trajectory_head(artifact, backbone, width=dims["hidden_size"], blocks=dims["num_layers"] - 1,
                             max_length=max_length)
    bundle = root / f"bundle-{max_length}"
    if not (bundle / "siren_bundle.json").is_file():
        export_bundle(str(artifact), bundle, overwrite=True, show_progress=False)
    return artifact, bundle


def measure(size: str, workdir: Path, turns: int) -> dict:
    import torch
    from siren_guard import AgentSirenGuard as Reference
    from siren_runtime import AgentSirenGuard
    torch.set_num_threads(os.cpu_count() or 1)
    artifact, bundle = build(size, workdir, 8192)
    messages = agent_loop(turns)
    out = {"size": size, "turns": turns, "messages": len(messages)}
    with AgentSirenGuard.from_pretrained(bundle, device="cpu") as guard:
        final_ids = guard.token_ids({"messages": messages, "tools": TOOLS})
        out["final_tokens"] = len(final_ids)
        guard.score_trajectory(messages=messages[:3], tools=TOOLS)           # warm up
        started = time.perf_counter()
        whole = guard.score_trajectory(messages=messages, tools=TOOLS).score
        out["whole_s"] = time.perf_counter() - started
        session = guard.session(tools=TOOLS)
        ran, started = 0, time.perf_counter()
        for message in messages:
            result = session.append(message)
            ran += session.tokens - session._held.state.start
        out["turns_s"] = time.perf_counter() - started
        out["turns_ran_tokens"] = ran
        out["turns_max_diff"] = abs(result.score - whole)
        guard.score_streaming(messages, TOOLS)                                # the run so far, cached
        started = time.perf_counter()
        guard.score_streaming(messages + [PROPOSED], TOOLS)
        out["proposal_s"] = time.perf_counter() - started
        proposal_ids = guard.token_ids({"messages": messages + [PROPOSED], "tools": TOOLS})
        out["proposal_tokens"] = len(proposal_ids) - len(final_ids)
        cached, _ = guard._stream_cache.checkout("".join(map(chr, proposal_ids)))
        out["proposal_ran_tokens"] = len(cached.ids) - cached.start
    reference = Reference.from_pretrained(str(artifact), device="cpu", dtype=torch.float32)
    started = time.perf_counter()
    ref_whole = reference.score_trajectory(messages=messages, tools=TOOLS).score
    out["ref_whole_s"] = time.perf_counter() - started
    started = time.perf_counter()
    for end in range(1, len(messages) + 1):
        reference.score_streaming(messages[:end], TOOLS)
    out["ref_turns_s"] = time.perf_counter() - started
    out["ref_max_diff"] = abs(ref_whole - whole)
    del reference
    _, small = build(size, workdir, 1024)
    with AgentSirenGuard.from_pretrained(small, device="cpu") as guard:
        session = guard.session(tools=TOOLS)
        most = 0
        for message in messages:
            session.append(message)
            most = max(most, session.tokens - session._held.state.start)
        out["over_budget_max_ran"] = most
        out["over_budget_bound"] = 1024 - 1024 // 2
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"])
    parser.add_argument("--turns", type=int, default=48)
    parser.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "siren-agent-bench"))
    args = parser.parse_args()
    from siren_export.bench import cpu_isa
    rows = [measure(size, Path(args.workdir), args.turns) for size in args.sizes]
    print(f"CPU: {cpu_isa()}; load average at start {os.getloadavg()[0]:.2f}\n")
    print("| size | messages | final tokens | one whole score | turn by turn (ids run) | turns / whole | "
          "proposed call: ids / ran / time | llm-siren whole | llm-siren turn by turn | turn-by-turn speed-up | "
          "max \\|Δ\\| vs llm-siren | over budget: most ids one append ran (bound) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['messages']} | {r['final_tokens']:,} | {r['whole_s'] * 1000:.0f} ms | "
              f"{r['turns_s'] * 1000:.0f} ms ({r['turns_ran_tokens']:,}) | {r['turns_s'] / r['whole_s']:.2f}x | "
              f"{r['proposal_tokens']} / {r['proposal_ran_tokens']} / {r['proposal_s'] * 1000:.1f} ms | "
              f"{r['ref_whole_s'] * 1000:.0f} ms | {r['ref_turns_s']:.1f} s | {r['ref_turns_s'] / r['turns_s']:.1f}x | "
              f"{max(r['ref_max_diff'], r['turns_max_diff']):.1e} | {r['over_budget_max_ran']} ({r['over_budget_bound']}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

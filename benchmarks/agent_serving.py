"""What agent traffic costs over HTTP: a run appended turn by turn to a trajectory session, and
LiteLLM's streamed checks of one response, on one `siren serve` holding a content and an
Agent-SIREN guard.

    python benchmarks/agent_serving.py [--size mid] [--turns 30] [--workdir DIR]

- A `--turns`-turn agent loop (benchmarks/agent_turns.py's) appended message by message to
  /v1/trajectories/sessions, against one whole score of the final run (/v1/trajectories/score)
  and against rescoring the run so far after each message (what a client without sessions
  does), all on the same server.
- A response streamed to LiteLLM's route in chunks (checked every chunk, as LiteLLM samples
  them): with a `litellm_call_id` (one stream, each check feeds the new text) and without
  (each check scores the text so far whole); the first and last checks' times show whether a
  check costs the new text or the whole.
Prints Markdown tables with the CPU's ISA. Not a test: a table the developer reads.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))       # serve_process: the server in a torch-blocked child
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _timed(call):
    started = time.perf_counter()
    value = call()
    return value, time.perf_counter() - started


def measure_turns(url: str, messages: list, tools: list) -> dict:
    import httpx
    http = httpx.Client(base_url=url, timeout=600)
    score = lambda run: http.post("/v1/trajectories/score", json={"messages": run, "tools": tools}).json()  # noqa: E731
    score(messages[:3])                                                   # warm up
    whole, whole_s = _timed(lambda: score(messages))

    def appended(groups: list) -> tuple:
        opened = http.post("/v1/trajectories/sessions", json={"tools": tools}).json()
        url_of = f"/v1/trajectories/sessions/{opened['id']}"
        started = time.perf_counter()
        for group in groups:
            state = http.post(url_of, json={"messages": group}).json()
        seconds = time.perf_counter() - started
        http.delete(url_of)
        return state, seconds
    # per message: a verdict before each proposed call runs; per turn: a call and its output together
    state, messages_s = appended([[m] for m in messages])
    turn_groups = [messages[:2]] + [messages[i:i + 2] for i in range(2, len(messages), 2)]
    by_turn, turns_s = appended(turn_groups)
    started = time.perf_counter()
    for end in range(1, len(messages) + 1):
        score(messages[:end])
    rescoring_s = time.perf_counter() - started
    return {"messages": len(messages), "tokens": whole["tokens"], "whole_s": whole_s, "messages_s": messages_s,
            "turns": len(turn_groups), "turns_s": turns_s, "rescoring_s": rescoring_s,
            "diff": max(abs(state["score"] - whole["score"]), abs(by_turn["score"] - whole["score"]))}


def measure_litellm(url: str, prompt: str, response: str, chunk: int) -> dict:
    import httpx
    http = httpx.Client(base_url=url, timeout=600)
    ends = list(range(chunk, len(response) + 1, chunk))
    out = {"chars": len(response), "checks": len(ends)}
    for label, ids in (("with_ids", {"litellm_call_id": "bench-call"}), ("without_ids", {})):
        times = []
        for end in ends:
            body = {"input_type": "response", "texts": [response[:end]], **ids,
                    "structured_messages": [{"role": "user", "content": prompt}]}
            answer, seconds = _timed(lambda: http.post("/beta/litellm_basic_guardrail_api", json=body).json())
            times.append(seconds)
        out[label] = {"total_s": sum(times), "first_s": times[0], "last_s": times[-1],
                      "last_score": answer["siren"][0]["score"]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="mid")
    parser.add_argument("--turns", type=int, default=30)
    parser.add_argument("--chunk", type=int, default=40, help="characters between two LiteLLM checks")
    parser.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "siren-agent-bench"))
    args = parser.parse_args()
    import agent_turns
    from _models import build as build_content
    from serve_process import ServeProcess
    from siren_export.bench import cpu_isa

    workdir, load = Path(args.workdir), os.getloadavg()[0]
    _, agent_bundle = agent_turns.build(args.size, workdir, 8192)
    _, content_bundle = build_content(args.size, workdir, max_length=1024)
    server = ServeProcess(content_bundle, agent_bundle, "--name", "content", "--name", "agent", "--max-wait-ms", "1",
                          "--max-body-bytes", str(8 << 20)).start(timeout=600)
    try:
        turns = measure_turns(server.url, agent_turns.agent_loop(args.turns), agent_turns.TOOLS)
        response = ("Sure. First you gather what you need, then you follow these steps one by one, checking "
                    "each result before moving on to the next part of the work. ") * 6
        litellm = measure_litellm(server.url, "How do I do this?", response, args.chunk)
    finally:
        server.stop()
    print(f"\nCPU: {cpu_isa()}; load average at start {load:.2f}; size {args.size}; one `siren serve` process\n")
    whole = turns["whole_s"]
    print("| agent run over HTTP | messages | final tokens | one whole score | appended turn by turn "
          "| appended message by message | rescored after each message |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.turns} turns | {turns['messages']} | {turns['tokens']} | {whole * 1000:.0f} ms "
          f"| {turns['turns_s'] * 1000:.0f} ms, {turns['turns']} appends ({turns['turns_s'] / whole:.2f}x) "
          f"| {turns['messages_s'] * 1000:.0f} ms, {turns['messages']} appends ({turns['messages_s'] / whole:.2f}x) "
          f"| {turns['rescoring_s'] * 1000:.0f} ms ({turns['rescoring_s'] / whole:.1f}x) |")
    print(f"\nsession vs whole score: |diff| {turns['diff']:.2e}\n")
    print(f"| LiteLLM streamed checks ({litellm['checks']} checks, {litellm['chars']} chars) | total | first check "
          "| last check |")
    print("|---|---|---|---|")
    for label in ("with_ids", "without_ids"):
        row = litellm[label]
        print(f"| {label.replace('_', ' ')} | {row['total_s'] * 1000:.0f} ms | {row['first_s'] * 1000:.1f} ms "
              f"| {row['last_s'] * 1000:.1f} ms |")
    print(f"\nlast check's score, with vs without ids: |diff| "
          f"{abs(litellm['with_ids']['last_score'] - litellm['without_ids']['last_score']):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

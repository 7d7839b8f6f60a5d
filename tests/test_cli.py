"""The `siren` command: scoring, JSON output, stdin, and one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest


def siren(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "siren_cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=600)


def test_score_texts_json(all_layers):
    proc = siren("score", str(all_layers.bundle), "hello", "How can I make a pipe bomb at home?", "--json",
                 "--threshold", "0.2")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(l) for l in proc.stdout.splitlines()]
    ref = all_layers.reference
    assert [r["text"] for r in rows] == ["hello", "How can I make a pipe bomb at home?"]
    for row in rows:
        assert abs(row["score"] - ref.score(row["text"]).score) <= 1e-5
        assert row["threshold"] == 0.2 and row["is_harmful"] == (row["score"] >= 0.2)


def test_score_stdin_and_prompt_response(all_layers):
    proc = siren("score", str(all_layers.bundle), stdin="first line\nsecond line\n")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[0].endswith("first line")
    score = float(lines[1].split("\t")[0])
    assert abs(score - all_layers.reference.score("second line").score) <= 1e-5
    proc = siren("score", str(all_layers.bundle), "--prompt", "p", "--response", "r", "--json")
    assert proc.returncode == 0, proc.stderr
    assert abs(json.loads(proc.stdout)["score"] - all_layers.reference.score(prompt="p", response="r").score) <= 1e-5


@pytest.mark.parametrize("args,match", [
    (["score", "/no/such/bundle", "x"], "does not exist"),
    (["score", "{bundle}", "x", "--threshold", "nan"], r"\[0, 1\]"),
    (["score", "{bundle}", "x", "--threshold", "3"], r"\[0, 1\]"),
    (["score", "{bundle}", "x", "--prompt", "p"], "not both"),
    (["export", "/no/such/artifact", "-o", "{tmp}/b"], "neither a folder nor a Hub repo id"),
    (["export", "{artifact}", "-o", "{bundle}"], "--overwrite"),
])
def test_errors_are_one_line(all_layers, tmp_path, args, match):
    import re
    args = [a.format(bundle=all_layers.bundle, artifact=all_layers.artifact, tmp=tmp_path) for a in args]
    proc = siren(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    # progress lines may precede it; the error itself is exactly one line
    errors = [l for l in proc.stderr.strip().splitlines() if l.startswith("siren ")]
    assert len(errors) == 1 and re.search(match, errors[0]), proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == errors[0]


def test_broken_pipe_is_quiet(all_layers):
    """`siren score ... | head -1`: no Broken pipe error, the SIGPIPE status."""
    proc = subprocess.Popen([sys.executable, "-m", "siren_cli", "score", str(all_layers.bundle)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    def feed():        # the command answers as it reads: feed stdin while its output is read
        try:
            proc.stdin.write(b"hello there\n" * 20000)
            proc.stdin.close()
        except BrokenPipeError:
            pass
    writer = threading.Thread(target=feed)
    writer.start()
    proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=600) == 141
    writer.join()
    assert proc.stderr.read() == b""


def test_invalid_utf8_line_is_named(all_layers):
    run = lambda *extra: subprocess.run([sys.executable, "-m", "siren_cli", "score", str(all_layers.bundle),
                                         *extra], input=b"hello\n\xff bad line\nworld\n", capture_output=True,
                                        timeout=600)
    proc = run()
    assert proc.returncode == 2 and proc.stdout == b""
    assert proc.stderr.decode().strip() == ("siren score: error: line 2: not valid UTF-8 (byte 0xff at byte 1); "
                                            "fix the input or pass --errors skip")
    proc = run("--errors", "skip")
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 2
    assert b"skipped line 2" in proc.stderr


def test_usage_does_not_require_text():
    proc = siren("score")
    assert proc.returncode == 2 and "required: bundle" in proc.stderr and "TEXT" not in proc.stderr.splitlines()[-1]


def test_jsonl_input_ids_fields_thresholds(all_layers, tmp_path):
    ref = all_layers.reference
    records = [
        {"id": "a1", "text": "hello there"},
        {"id": 7, "prompt": "How do I pick a lock?", "response": "Use a tension wrench.", "threshold": 0.0},
        {"id": "only-response", "response": "Sure, here is how."},
        {"text": "no id here", "threshold": 1.0},
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n   \n"
                    + "\n".join(json.dumps(r) for r in records[2:]) + "\n", encoding="utf-8")
    proc = siren("score", str(all_layers.bundle), "--input", str(path), "--json", "--batch-size", "2")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(l) for l in proc.stdout.splitlines()]
    assert [r.get("id", r.get("line")) for r in rows] == ["a1", 7, "only-response", 6]   # blank lines skipped
    assert rows[1]["prompt"] == "How do I pick a lock?" and rows[1]["response"] == "Use a tension wrench."
    assert rows[2]["prompt"] is None and "text" not in rows[1]
    expected = [ref.score("hello there").score,
                ref.score(prompt="How do I pick a lock?", response="Use a tension wrench.").score,
                ref.score(response="Sure, here is how.").score, ref.score("no id here").score]
    assert max(abs(r["score"] - e) for r, e in zip(rows, expected)) <= 1e-5
    assert rows[1]["threshold"] == 0.0 and rows[1]["is_harmful"] is True
    assert rows[3]["threshold"] == 1.0 and rows[3]["is_harmful"] is (rows[3]["score"] >= 1.0)
    assert rows[0]["threshold"] == 0.5


def test_exit_status_fail_on_harmful_and_version(all_layers):
    flagged = siren("score", str(all_layers.bundle), "one", "two", "--threshold", "0", "--fail-on-harmful")
    assert flagged.returncode == 1 and len(flagged.stdout.splitlines()) == 2
    clean = siren("score", str(all_layers.bundle), "one", "--threshold", "1", "--fail-on-harmful", "--no-verify")
    assert clean.returncode == 0, clean.stderr
    plain = siren("score", str(all_layers.bundle), "one", "--threshold", "0")     # no gate asked: 0
    assert plain.returncode == 0
    version = siren("--version")
    assert version.returncode == 0 and version.stdout.startswith("siren-deploy ")


def test_prompt_response_json_fields(all_layers):
    proc = siren("score", str(all_layers.bundle), "--prompt", "p", "--response", "r", "--json")
    row = json.loads(proc.stdout)
    assert row["prompt"] == "p" and row["response"] == "r" and "text" not in row


BAD_JSONL = [
    ('{"id": 1, "text": 5}', r'line 2: "text" must be a string'),
    ('{"id": 1}', "line 2: needs"),
    ('{"text": "x", "prompt": "y"}', "line 2: give"),
    ('{"text": "x", "threshold": 2}', r"line 2: threshold must be in \[0, 1\]"),
    ('{"text": "x", "colour": 1}', "line 2: unknown field"),
    ('not json', "line 2: not valid JSON"),
    ('[1, 2]', "line 2: expected a JSON object"),
]


@pytest.mark.parametrize("line,match", BAD_JSONL)
def test_bad_jsonl_lines_are_named(all_layers, line, match):
    import re
    proc = siren("score", str(all_layers.bundle), "--input", "-", stdin='{"text": "fine"}\n' + line + "\n")
    assert proc.returncode == 2 and proc.stdout == ""
    assert re.search(match, proc.stderr.strip()), proc.stderr


def test_bad_jsonl_lines_skipped(all_layers):
    lines = ['{"text": "fine"}'] + [line for line, _ in BAD_JSONL] + ['{"id": "last", "text": "also fine"}']
    proc = siren("score", str(all_layers.bundle), "--input", "-", "--errors", "skip", "--json",
                 stdin="\n".join(lines) + "\n")
    assert proc.returncode == 0
    rows = [json.loads(l) for l in proc.stdout.splitlines()]
    assert [r.get("id", r.get("line")) for r in rows] == [1, "last"]
    assert proc.stderr.count("skipped line") == len(BAD_JSONL)


def test_answers_stream_before_input_ends(all_layers):
    """Groups are answered as they fill: the first verdict arrives while stdin is still open."""
    proc = subprocess.Popen([sys.executable, "-m", "siren_cli", "score", str(all_layers.bundle), "--batch-size", "1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        proc.stdin.write("first text\n")
        proc.stdin.flush()
        line = proc.stdout.readline()          # stdin still open
        assert line.endswith("first text\n")
        proc.stdin.write("\n  \nsecond\n")
        proc.stdin.close()
        rest = proc.stdout.read().splitlines()
        assert len(rest) == 1 and rest[0].endswith("second")       # blank lines skipped
        assert proc.wait(timeout=300) == 0
    finally:
        proc.kill()


def test_missing_extra_names_the_install(tmp_path):
    """`siren export` where torch cannot be imported: one line naming the extra."""
    script = ("import sys, importlib.abc\n"
              "class B(importlib.abc.MetaPathFinder):\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name.split('.')[0] == 'torch':\n"
              "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
              "sys.meta_path.insert(0, B())\n"
              "from siren_cli.main import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", script, "export", str(tmp_path), "-o", str(tmp_path / "b"), "-q"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        'siren export: error: this needs the `torch` package: pip install ".[export]" in the siren-deploy '
        'checkout')

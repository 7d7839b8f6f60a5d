"""The `siren` command: scoring, JSON output, stdin, and one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def siren(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "siren_export.cli", *args], input=stdin,
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
    proc = subprocess.Popen([sys.executable, "-m", "siren_export.cli", "score", str(all_layers.bundle)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(b"hello there\n" * 20000)
    proc.stdin.close()
    proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(timeout=600) == 141
    assert proc.stderr.read() == b""


def test_invalid_utf8_line_is_named(all_layers):
    run = lambda *extra: subprocess.run([sys.executable, "-m", "siren_export.cli", "score", str(all_layers.bundle),
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

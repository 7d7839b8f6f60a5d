"""The command line under bad input (adversarial probe of issue 21): bad JSON Lines records are
named by line and can be skipped, a closed stdout is one clear error, and --quiet silences the
Hub's retry warnings (printed once otherwise)."""
from __future__ import annotations

import json
import os
import subprocess
import sys


from helpers import BLOCKER, TOL


def test_jsonl_bad_records_are_named_by_line_and_skippable(all_layers, guard, tmp_path, capsys):
    from siren_cli.main import main
    lines = ['{"id": "a", "text": "first fine text"}',
             '{"id": "b", "text": "bad \\ud800 surrogate"}',
             '{"id": "c", "prompt": "\\udfff", "response": "x"}',
             '{"id": "d", "text": "x", "threshold": ' + "9" * 5000 + '}',
             '{"id": ' + "[" * 100000 + "]" * 100000 + ', "text": "deep id"}',
             '{"id": "\\ud800", "text": "surrogate id"}',
             '{"id": NaN, "text": "nan id"}',
             '{"id": Infinity, "text": "inf id"}',
             '{"id": 1e999, "text": "overflow id"}',
             '{"id": "z", "text": "last fine text"}']
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert main(["score", str(all_layers.bundle), "--input", str(path), "--json", "--batch-size", "4",
                 "--errors", "skip", "-q"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["id"] for r in rows] == ["a", "z"]
    assert abs(rows[0]["score"] - guard.score("first fine text").score) <= TOL
    for number in range(2, 10):
        assert f"skipped line {number}:" in captured.err, captured.err
    assert main(["score", str(all_layers.bundle), "--input", str(path), "-q"]) == 2
    assert "line 2:" in capsys.readouterr().err


def test_closed_stdout_is_a_clear_error(all_layers):
    script = BLOCKER + "from siren_cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
    done = subprocess.run([sys.executable, "-c", script, "score", str(all_layers.bundle), "hello", "-q"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                          preexec_fn=lambda: os.close(1))
    assert done.returncode == 2 and "standard output is closed" in done.stderr, done.stderr
    assert "NoneType" not in done.stderr


def test_quiet_silences_hub_retry_warnings_and_prints_them_once_otherwise():
    probe = ("import logging, sys\nfrom siren_cli.main import configure_output\n"
             "configure_output(quiet=sys.argv[1] == 'q', verbose=False)\n"
             "import huggingface_hub.utils.logging as l\n"
             "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')\n")
    for mode, count in (("q", 0), ("-", 1)):
        env = {k: v for k, v in os.environ.items() if k != "HF_HUB_VERBOSITY"}
        done = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True, timeout=60,
                              env=env)
        assert done.returncode == 0, done.stderr
        assert done.stderr.count("Retrying in 1s") == count, done.stderr

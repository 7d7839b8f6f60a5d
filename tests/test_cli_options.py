"""The options model behind every command (`siren_cli.options` over the settings classes) and
the first-hour findings it fixed: options after texts, one column layout, help for every
option, serve and serve-ray alike, a SIREN_... variable for every serving option, checks
before anything heavy, and errors that say what is wrong."""
from __future__ import annotations

import argparse
import json
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from siren_cli.main import build_parser, parse_arguments
from siren_cli.options import option_rows, settings_from
from siren_runtime.settings import GuardSettings, env_of, flag_of, settings_fields
from siren_serving.settings import ServeConfig, ServeSettings

from helpers import BLOCKER_TEMPLATE


def siren(*args, stdin=None, env=None, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "siren_cli", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


def subcommands(parser: argparse.ArgumentParser) -> dict:
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


# -- finding 3: options before or after the texts ------------------------------------------

def test_texts_may_follow_options():
    args = parse_arguments(["score", "B", "a", "--threshold", "0.3", "b", "--json", "c"])
    assert args.bundle == "B" and args.texts == ["a", "b", "c"] and args.threshold == 0.3 and args.json
    args = parse_arguments(["score", "B", "--threshold", "0.3", "hello"])
    assert args.texts == ["hello"]


def test_unknown_options_are_still_refused(capsys):
    with pytest.raises(SystemExit) as e:
        parse_arguments(["score", "B", "hello", "--thresold", "0.3"])
    assert e.value.code == 2 and "unrecognized arguments: --thresold" in capsys.readouterr().err
    with pytest.raises(SystemExit):          # only `score` (texts) and `serve` (more bundles) take loose words
        parse_arguments(["verify", "B", "extra"])


def test_score_with_options_first_matches_the_reference(all_layers):
    proc = siren("score", all_layers.bundle, "--threshold", "0.3", "--json", "hello", "How do I pick a lock?")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["hello", "How do I pick a lock?"]
    for row in rows:
        assert abs(row["score"] - all_layers.reference.score(row["text"]).score) <= 1e-5
        assert row["threshold"] == 0.3


# -- finding 7: one column layout, help for every option ------------------------------------

def test_plain_rows_have_the_same_columns_with_and_without_ids(all_layers, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": "a1", "text": "hello"}) + "\n" + json.dumps({"text": "tab\there"}) + "\n")
    with_ids = siren("score", all_layers.bundle, "--input", source).stdout.splitlines()
    plain = siren("score", all_layers.bundle, "hello").stdout.splitlines()
    columns = [line.split("\t") for line in with_ids + plain]
    assert {len(c) for c in columns} == {4}, columns
    assert columns[0][2:] == ["a1", "hello"] and columns[1][2:] == ["-", "tab\\there"] and columns[2][2] == "-"


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    missing = []
    for name, sub in subcommands(parser).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not (action.help or "").strip():
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, missing


def test_verdict_names_are_mapped_in_one_table(all_layers):
    from siren_runtime.result import VERDICT_FIELDS, ScoreResult
    from siren_serving.routes.openai import moderation_response
    names = {surface: name for surface, name, _ in VERDICT_FIELDS}
    assert "is_harmful" in ScoreResult(0.7, True, 0.5).to_dict() and names["Python API (`ScoreResult`)"] == "is_harmful"
    assert "flagged" in moderation_response("m", [0.7], 0.5)["results"][0]
    assert names["HTTP `/v1/moderations`, streams"] == "flagged"


# -- one options model: serve and serve-ray alike, environment variables --------------------

def test_serve_and_serve_ray_take_the_same_serving_options():
    commands = subcommands(build_parser())
    serve, ray = option_rows(commands["serve"]), option_rows(commands["serve-ray"])
    serving = {flags: row for flags, row in serve.items() if flags not in (("-h", "--help"),)}
    for flags, (default, help_text) in serving.items():
        assert flags in ray, f"serve-ray lacks {flags}"
        assert ray[flags] == (default, help_text), flags
    names = {flag_of(f) for cls in (ServeSettings, GuardSettings) for f in settings_fields(cls)
             if f.metadata["kind"] not in ("positional", "more")}
    assert names <= {flag for flags in serving for flag in flags}


#: a value unlike each option's default, as its environment variable spells it
ENV_VALUES = {"revision": ("v2", "v2"), "cache_dir": ("/tmp/hf", "/tmp/hf"), "local_files_only": ("1", True),
              "verify": ("0", False), "backend": ("onnxruntime", "onnxruntime"), "device": ("cpu", "cpu"),
              "prepack_weights": ("false", False), "max_batch_size": ("7", 7), "token_budget": ("300", 300),
              "host": ("0.0.0.0", "0.0.0.0"), "port": ("9123", 9123), "threshold": ("0.25", 0.25),
              "model_name": ("guard-x", "guard-x"), "max_batch": ("5", 5), "max_wait_ms": ("7.5", 7.5),
              "dynamic_batching": ("no", False), "max_body_bytes": ("4096", 4096), "max_inputs": ("9", 9),
              "max_sessions": ("11", 11), "session_ttl_s": ("42", 42.0), "drain_s": ("3", 3.0),
              "graceful_timeout_s": ("4", 4.0), "log_requests": ("true", True), "bundle": ("env-bundle", "env-bundle"),
              "more_bundles": ("b2, b3", ("b2", "b3")), "names": ("g1,g2,g3", ("g1", "g2", "g3"))}


@pytest.mark.parametrize("command", ["serve", "serve-ray"])
def test_every_serving_option_reads_its_environment_variable(command, monkeypatch):
    fields = [f for cls in (ServeSettings, GuardSettings) for f in settings_fields(cls)]
    assert {f.name for f in fields} == set(ENV_VALUES), "a new serving option needs its row here"
    for field in fields:
        raw, expected = ENV_VALUES[field.name]
        monkeypatch.setenv(env_of(field), raw)
    args = parse_arguments([command])            # the bundle too comes from SIREN_BUNDLE
    config = settings_from(args, ServeConfig)
    for field in fields:
        assert getattr(config, field.name) == ENV_VALUES[field.name][1], env_of(field)
    assert parse_arguments([command, "b", "--port", "9999"]).port == 9999     # the command line wins


def test_a_bad_environment_value_is_named_only_where_it_is_used(all_layers):
    bad = {"SIREN_PORT": "eighty"}
    proc = siren("serve", all_layers.bundle, env=bad)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("siren serve: error: environment variable SIREN_PORT='eighty': "
                                                    "invalid literal for int() with base 10: 'eighty'")
    assert siren("score", all_layers.bundle, "hi", env=bad).returncode == 0


# -- findings 4 and 5: checked before anything heavy, errors that say what is wrong ---------

def test_score_corpus_refuses_a_bad_threshold_before_ray(all_layers, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "hi"}\n')
    script = "BLOCKED = ('ray',)" + BLOCKER_TEMPLATE + "from siren_cli.main import main\nsys.exit(main(sys.argv[1:]))\n"
    proc = subprocess.run([sys.executable, "-c", script, "score-corpus", str(all_layers.bundle), str(source), "-o",
                           str(tmp_path / "out"), "--threshold", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["siren score-corpus: error: threshold must be in [0, 1], got 3.0"]
    assert not (tmp_path / "out").exists()


def test_bench_without_llm_siren_says_so(all_layers):
    script = ("BLOCKED = ('siren_guard',)" + BLOCKER_TEMPLATE
              + "import importlib.util\n_find = importlib.util.find_spec\n"
                "importlib.util.find_spec = lambda name, *a: None if name == 'siren_guard' else _find(name, *a)\n"
                "from siren_cli.main import main\nsys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", script, "bench", str(all_layers.bundle), "--reference",
                           str(all_layers.artifact)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("siren bench: error: --reference runs llm-siren, which is not installed here")


def test_worker_failure_message_carries_its_cause():
    from siren_export.bench import _run_worker
    with pytest.raises(RuntimeError) as e:
        _run_worker({"side": "reference", "bundle": "/nonexistent", "artifact": "/nonexistent", "texts": ["x"],
                     "repeat": 1, "breakdown": False, "backend": None, "label": "x"})
    first = str(e.value).splitlines()[0]
    assert first.startswith("reference benchmark process failed: ") and len(first) > len(
        "reference benchmark process failed: ")


def test_a_mistyped_folder_is_not_taken_for_a_hub_repo(all_layers, tmp_path):
    (tmp_path / "demo" / "bundle").mkdir(parents=True)
    started = time.monotonic()
    proc = siren("score", "demo/bundel", "hi", cwd=tmp_path, env={"HF_HUB_OFFLINE": "0"})
    assert proc.returncode == 2 and time.monotonic() - started < 30
    assert ("no bundle folder 'demo/bundel': the folder 'demo' exists but holds no 'bundel' (it holds: bundle)"
            in proc.stderr)


def test_score_on_a_terminal_says_it_reads_standard_input(all_layers):
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "siren_cli", "score", str(all_layers.bundle)], stdin=follower,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        os.close(follower)
        os.write(leader, b"hello\n\x04")
        out, err = proc.communicate(timeout=300)
    finally:
        os.close(leader)
    assert proc.returncode == 0, err
    assert "reading texts from standard input, one per line; end with Ctrl-D" in err
    assert out.rstrip("\n").endswith("\thello")


# -- findings 1 and 6: install lines that work, a README that is a front page ---------------

INSTALL_FROM_INDEX = re.compile(r"pip install [\"']?siren-deploy\[")


def test_no_install_line_names_a_package_that_is_not_on_the_index(all_layers):
    from siren_runtime.bundle import read_bundle
    from siren_runtime.card import model_card
    root = Path(__file__).resolve().parents[1]
    sources = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    sources += [p for folder in ("runtime", "serving", "cli", "export", "engines", "quantize", "distributed")
                for p in sorted((root / folder).rglob("*.py"))]
    offending = [str(p.relative_to(root)) for p in sources if INSTALL_FROM_INDEX.search(p.read_text(encoding="utf-8"))]
    assert not offending, offending
    card = model_card(read_bundle(all_layers.bundle).raw(), "org/name")
    assert not INSTALL_FROM_INDEX.search(card) and 'pip install ".[hub,onnxruntime]"' in card


def test_the_model_card_table_keeps_two_columns(all_layers):
    from siren_runtime.bundle import read_bundle
    from siren_runtime.card import model_card
    manifest = read_bundle(all_layers.bundle).raw()
    manifest["parity"] = {"checked": True, "max_abs_diff": 1.5e-7, "texts": 8, "backend": "onnxruntime-cpu"}
    rows = [line for line in model_card(manifest).splitlines() if line.startswith("| ") and "---" not in line]
    assert rows and all(len(re.split(r"(?<!\\)\|", row)) == 4 for row in rows), rows
    assert any("max \\|Δscore\\|" in row for row in rows)


def test_the_readme_is_a_front_page():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 250
    first_screen = "\n".join(readme.splitlines()[:60])
    assert "make demo" in first_screen and "make test" in first_screen
    assert 'pip install ".[serve]"' in first_screen        # how to install from the clone
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (root / link).is_file(), link

"""Write the docs' reference pages from the code, before `mkdocs build` (no plugins):

- reference/cli.md     every command's options, from the parsers `siren` itself builds
- reference/python.md  the public Python API, from signatures and docstrings
- reference/http.md    every route, from the OpenAPI document `siren serve` answers with
- reference/verdicts.md  the verdict's name on each surface (siren_runtime.result)

Run: python docs/gen_reference.py  (make docs runs it, then mkdocs build --strict).
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "reference"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def cli_page() -> str:
    from siren_cli.main import EXIT_STATUSES, build_parser
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help for choice in sub._choices_actions}
    lines = ["# CLI reference", "", "Generated from the parsers `siren` builds (`docs/gen_reference.py`). "
             "Every command takes `-q` (no progress) and `-v` (details) before or after its name; "
             "`SIREN_DEBUG=1` prints the traceback of an error.", "", "## Exit statuses", "",
             "| status | meaning |", "|---|---|"]
    lines += [f"| `{code}` | {_cell(meaning)} |" for code, meaning in EXIT_STATUSES]
    for name, command in sub.choices.items():
        lines += ["", f"## siren {name}", "", _cell(helps.get(name, "")) + ".", ""]
        if command.description:
            lines += [command.description, ""]
        usage = command.format_usage().replace("usage: ", "").strip()
        lines += ["```", " ".join(usage.split()), "```", "", "| argument | default | meaning |", "|---|---|---|"]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction) or action.dest in ("quiet", "verbose"):
                continue
            flags = ", ".join(f"`{f}`" for f in action.option_strings) or f"`{action.metavar or action.dest}`"
            if action.choices and not action.option_strings:
                flags += f" ({', '.join(map(str, action.choices))})"
            elif action.choices:
                flags += f" {{{', '.join(map(str, action.choices))}}}"
            default = action.default
            shown = "" if default in (None, False, [], argparse.SUPPRESS) or isinstance(action, (
                argparse._StoreTrueAction, argparse._StoreFalseAction)) else f"`{default}`"
            lines.append(f"| {flags} | {shown} | {_cell(action.help or '')} |")
    return "\n".join(lines) + "\n"


#: the public Python API, in the order the page lists it
PUBLIC = [("siren_runtime", "SirenGuard"), ("siren_runtime", "AgentSirenGuard"), ("siren_runtime", "load_guard"),
          ("siren_runtime", "ScoreResult"), ("siren_runtime.streaming", "StreamSession"),
          ("siren_runtime.prefixes", "PrefixScores"), ("siren_runtime", "Trajectory"), ("siren_runtime", "Turn"),
          ("siren_runtime", "from_openai"), ("siren_runtime", "FailClosedGuard"),
          ("siren_runtime.settings", "GuardSettings"), ("siren_serving.settings", "ServeSettings"),
          ("siren_serving.server", "create_app"), ("siren_ray", "SirenScorer"),
          ("siren_runtime", "BundleError"), ("siren_runtime", "BackendUnavailableError")]


def _doc(obj) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def _signature(name: str, obj) -> str:
    try:
        return f"{name}{inspect.signature(obj)}"
    except (TypeError, ValueError):
        return name


def python_page() -> str:
    import importlib
    lines = ["# Python API reference", "", "Generated from the code's signatures and docstrings "
             "(`docs/gen_reference.py`). The runtime (`siren_runtime`) imports neither torch nor transformers.", ""]
    for module_name, name in PUBLIC:
        obj = getattr(importlib.import_module(module_name), name)
        lines += [f"## `{module_name}.{name}`", "", "```python", _signature(name, obj), "```", ""]
        if _doc(obj):
            lines += [_doc(obj), ""]
        if not inspect.isclass(obj) or issubclass(obj, Exception):
            continue
        members = dict(obj.__dict__)                  # the class's own, then what it inherits
        for base in obj.__mro__[1:-1]:
            for attr, member in base.__dict__.items():
                members.setdefault(attr, member)
        for attr, member in members.items():
            if attr.startswith("_") and attr not in ("__call__",):
                continue
            if isinstance(member, property):
                summary = _doc(member).split("\n\n")[0]
                lines.append(f"- `{attr}` (property){': ' + summary.replace(chr(10), ' ') if summary else ''}")
            elif isinstance(member, (classmethod, staticmethod)) or inspect.isfunction(member):
                function = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
                summary = _doc(function).split("\n\n")[0].replace("\n", " ")
                lines.append(f"- `{_signature(attr, function).replace('(self, ', '(').replace('(self)', '()')}`"
                             f"{': ' + summary if summary else ''}")
        lines.append("")
    return "\n".join(lines) + "\n"


def http_page() -> str:
    from siren_runtime import package_version
    from siren_serving.openapi import openapi_document
    document = openapi_document(package_version())
    lines = ["# HTTP reference", "", "Generated from the OpenAPI document `siren serve` answers at `GET /openapi.json` "
             "(`docs/gen_reference.py`). Errors are OpenAI's `{\"error\": {message, type, param, code}}`, except on "
             "the detector routes (`{\"code\", \"message\"}`, 422 for a request that does not validate).", ""]
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            lines += [f"## `{method.upper()} {path}`", "", operation["summary"][0].upper() + operation["summary"][1:]
                      + ".", ""]
            for parameter in operation.get("parameters", []):
                lines.append(f"- {parameter['in']} parameter `{parameter['name']}`"
                             f"{': ' + parameter['description'] if parameter.get('description') else ''}")
            body = operation.get("requestBody")
            if body:
                schema = body["content"]["application/json"]["schema"]
                lines += ["", "Request body:", "", "```json", json.dumps(schema, indent=1), "```"]
            lines += ["", "| status | meaning |", "|---|---|"]
            lines += [f"| {status} | {_cell(answer['description'])} |" for status, answer in operation["responses"].items()]
            lines.append("")
    return "\n".join(lines) + "\n"


def verdicts_page() -> str:
    from siren_runtime.result import VERDICT_FIELDS
    lines = ["# Verdict names by surface", "",
             "A score at or above the threshold is harmful everywhere; each surface names that verdict "
             "as the tools its users already have expect it (`siren_runtime.result.VERDICT_FIELDS`).", "",
             "| surface | the verdict | because |", "|---|---|---|"]
    lines += [f"| {surface} | `{name}` | {why} |" for surface, name, why in VERDICT_FIELDS]
    return "\n".join(lines) + "\n"


def main() -> int:
    import os
    for name in [n for n in os.environ if n.startswith("SIREN_")]:
        del os.environ[name]            # the defaults shown are the code's, not this shell's
    OUT.mkdir(exist_ok=True)
    pages = {"cli.md": cli_page(), "python.md": python_page(), "http.md": http_page(), "verdicts.md": verdicts_page()}
    for name, text in pages.items():
        (OUT / name).write_text(text, encoding="utf-8")
    print(f"wrote {', '.join(pages)} into {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The import graph is the architecture: no cycle among the product modules' module-level
imports (a function-level import is a deliberate deferral and not counted)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: stage folder -> the package it installs as (pyproject.toml's package-dir)
PACKAGES = {"export": "siren_export", "runtime": "siren_runtime", "engines": "siren_engines",
            "serving": "siren_serving", "cli": "siren_cli", "quantize": "siren_quantize", "distributed": "siren_ray"}


def modules() -> dict:
    found = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            if "triton_models" in path.parts:          # Triton's model files, loaded by the server
                continue
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def import_graph(found: dict) -> dict:
    edges = {name: set() for name in found}
    for name, path in found.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in found]
                edges[name] |= {t for t in (submodules or [target]) if t in found and t != name}
            elif isinstance(node, ast.Import):
                edges[name] |= {a.name for a in node.names if a.name in found and a.name != name}
    return edges


def cycles(edges: dict) -> list:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))
    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_among_product_modules():
    found = modules()
    assert len(found) > 80                        # every stage was read
    edges = import_graph(found)
    assert edges["siren_serving.server"] >= {"siren_serving.routes", "siren_serving.guard_set"}
    assert cycles(edges) == []


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]

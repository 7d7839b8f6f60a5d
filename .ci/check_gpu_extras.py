"""Do the GPU extras resolve on real boxes? `pip install --dry-run --report` (metadata only,
nothing is downloaded beyond it) for every GPU extra, and the export + TensorRT environment
the README recommends, on Python 3.10-3.12 for manylinux x86_64; one table, exit 1 when
any pair does not resolve or resolves to a mismatched CUDA pair.

    python .ci/check_gpu_extras.py [--python 3.10 3.11 3.12] [--extra NAME ...]

Run it when a dependency range changes, or on a schedule: a new release that breaks a
pair (a CUDA 13 onnxruntime-gpu under the cu12 extra, a cuda-python beside a torch that
needs other cuda-bindings) shows here before it shows on a user's node. Needs the package
index; the project itself is not built (its requirements are read from pyproject.toml).

TensorRT's PyPI packages (`tensorrt-cu12`, `tensorrt-cu13`, their `-libs`) are placeholders
that fetch the real wheels from https://pypi.nvidia.com while pip prepares their metadata, so
those rows resolve against that index too. Where it cannot be reached (an air-gapped or
registry-only machine) the row resolves everything else with the TensorRT Python bindings
wheel of the same line (on PyPI, the part that meets cuda-python and torch) in place of the
placeholder, and says so: "bindings only".
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ImportError:                                   # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
#: what each environment must resolve to: the CUDA major of every GPU package in it
ENVIRONMENTS = {
    "onnxruntime-gpu-cu12": 12, "onnxruntime-gpu-cu13": 13,
    "tensorrt-cu12": 12, "tensorrt-cu13": 13,
    "export,tensorrt-cu13": 13,                       # the README's export box with TensorRT
}
#: resolved, but not to be recommended: torch is held back (cuda-python 12 beside a torch that
#: needs cuda-bindings 13), so the README says to export in an environment of its own
NOT_RECOMMENDED = {"export,tensorrt-cu12": 12}
#: upstream has no wheel for that Python (README says so); the row must fail to resolve
UNAVAILABLE = {("onnxruntime-gpu-cu13", "3.10"): "onnxruntime-gpu 1.27+ (CUDA 13) has no Python 3.10 wheel"}
NVIDIA_INDEX = "https://pypi.nvidia.com"
#: a current x86_64 Linux GPU node (glibc 2.35, Ubuntu 22.04): every manylinux tag it accepts
PLATFORMS = [arg for glibc in range(35, 16, -1) for arg in ("--platform", f"manylinux_2_{glibc}_x86_64")] + [
    "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64"]
KEY_PACKAGES = ("onnxruntime-gpu", "cuda-python", "cuda-bindings", "tensorrt-cu12", "tensorrt-cu13", "torch")


def requirements(extras: str) -> list[str]:
    """The project's dependencies plus those of `extras`, self-references expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name, table = project["name"], project["optional-dependencies"]
    out, todo, seen = list(project["dependencies"]), extras.split(","), set()
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in table[extra]:
            inner = re.fullmatch(rf"{re.escape(name)}\[([^\]]+)\]", req.strip())
            if inner:
                todo.extend(inner.group(1).split(","))
            else:
                out.append(req)
    return out


def bindings_only(reqs: list[str]) -> list[str]:
    """`reqs` with each TensorRT placeholder swapped for its bindings wheel (same versions)."""
    return [re.sub(r"^(tensorrt-cu1[23])(?=[<>=!~ ;]|$)", r"\1-bindings", r.strip()) for r in reqs]


def nvidia_index_reachable() -> bool:
    import urllib.request
    try:
        urllib.request.urlopen(f"{NVIDIA_INDEX}/tensorrt-cu12-libs/", timeout=10).close()
        return True
    except OSError:
        return False


def resolve(reqs: list[str], python: str, index: str = "") -> tuple[bool, dict, str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
               "--report", str(report), "--python-version", python, "--only-binary=:all:",
               *PLATFORMS, "--target", str(Path(tmp) / "t"), *reqs]
        if index:
            cmd[4:4] = ["--extra-index-url", index]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            return False, {}, (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        chosen = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                  for item in json.loads(report.read_text())["install"]}
    return True, chosen, ""


def cuda_major(package: str, version: str) -> int:
    """The CUDA major a resolved GPU package targets."""
    major = int(version.split(".")[0])
    if package == "onnxruntime-gpu":
        minor = int(version.split(".")[1])
        return 13 if (major, minor) >= (1, 27) else 12
    if package in ("cuda-python", "cuda-bindings"):
        return major
    return int(package[-2:]) if package.startswith("tensorrt-cu") else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", nargs="+", default=["3.10", "3.11", "3.12"])
    parser.add_argument("--extra", nargs="+", default=list(ENVIRONMENTS) + list(NOT_RECOMMENDED))
    args = parser.parse_args()
    failed = 0
    nvidia = nvidia_index_reachable()
    if not nvidia:
        print(f"{NVIDIA_INDEX} is not reachable: TensorRT rows resolve with the bindings wheel only\n")
    newest_torch = {}
    print("| extras | python | resolves | " + " | ".join(KEY_PACKAGES) + " | CUDA pair | verdict |")
    print("|---|---|---|" + "---|" * len(KEY_PACKAGES) + "---|---|")
    for extras in args.extra:
        for python in args.python:
            reqs, note, index = requirements(extras), "", ""
            if any(r.startswith("tensorrt-cu") for r in reqs):
                if nvidia:
                    index = NVIDIA_INDEX
                else:
                    reqs, note = bindings_only(reqs), " (bindings only)"
            ok, chosen, why = resolve(reqs, python, index)
            chosen = {p.removesuffix("-bindings") if p.startswith("tensorrt-cu") else p: v for p, v in chosen.items()}
            majors = {cuda_major(p, v) for p, v in chosen.items()
                      if p in ("onnxruntime-gpu", "cuda-python", "cuda-bindings", "tensorrt-cu12", "tensorrt-cu13")}
            want = {**ENVIRONMENTS, **NOT_RECOMMENDED}.get(extras, max(majors, default=0))
            pair_ok = ok and majors == {want}
            held_back = ""
            if ok and "torch" in chosen:
                if python not in newest_torch:
                    newest_torch[python] = resolve(["torch"], python)[1].get("torch", "?")
                if chosen["torch"] != newest_torch[python]:
                    held_back = f"torch held back to {chosen['torch']} (newest {newest_torch[python]})"
            if (extras, python) in UNAVAILABLE:
                verdict = ("expected: " + UNAVAILABLE[extras, python]) if not ok else \
                    "resolves now: update UNAVAILABLE and the README"
                good = not ok
            elif extras in NOT_RECOMMENDED:
                verdict = "not recommended: " + (held_back or "resolves") + "; export in its own environment"
                good = ok                                 # informative: it must still resolve
            else:
                verdict = held_back or "ok"
                good = pair_ok and not held_back
            failed += not good
            cells = " | ".join(chosen.get(p, "-") for p in KEY_PACKAGES)
            print(f"| {extras} | {python} | {('yes' + note) if ok else 'NO: ' + why[:80]} | {cells} | "
                  f"{'ok' if pair_ok else 'MISMATCH ' + str(sorted(majors))} | {verdict} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Make the offline GPU check kit: one folder to copy to a CUDA box that has torch+CUDA (and
cuda-bindings) but no network, no TensorRT and no onnxruntime-gpu.

    python benchmarks/gpu_offline/make_kit.py [-o dist/gpu-check] [--python 3.12]     (make gpu-kit)

The kit holds the wheels such a box lacks (this project, ONNX Runtime's CPU wheel, tokenizers,
llm-siren and their small dependencies, for one Python version: the box's, 3.12 by default,
whatever this machine runs), a tiny random-weight streaming bundle, check.py (with torch_engine.py), run.sh and the CPU
stand-in for cuda-bindings (for --cpu-substitute). What an ML image with torch already has is
left out **by name**, whatever versions the box has: torch, transformers, huggingface_hub,
safetensors, numpy and what they pull in (run.sh checks they import). It must stay under 60 MiB;
the size is printed.
On the box: `bash run.sh` (see check.py for what it checks).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
LIMIT_MIB = 60
#: the Python of the GPU box the kit is made for (its python3 is a virtual environment with torch)
BOX_PYTHON = "3.12"
#: what the kit installs, pinned to the versions this checkout is tested with
WANTED = ("onnxruntime", "tokenizers", "llm-siren")
#: what an ML image with torch has (these and what they pull in are left out of the kit)
ON_THE_BOX = ("torch", "transformers", "huggingface_hub", "safetensors", "numpy")


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def wheel_platform_args(python: str) -> list[str]:
    return ["--python-version", python, "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]


def resolve(pins: list[str], python: str, deps: bool = True) -> dict:
    """{name: version} that `pins` resolve to for `python` on manylinux x86_64 (metadata only)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
                        *([] if deps else ["--no-deps"]), "--report", str(report), "--target", str(Path(tmp) / "t"),
                        *wheel_platform_args(python), *pins], check=True)
        return {_norm(i["metadata"]["name"]): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}


def _requires(name: str, python: str) -> list[str]:
    """The names `name` (installed here) requires on the box: Linux x86_64, Python `python`."""
    from packaging.requirements import Requirement
    box = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
    return [_norm(r.name) for r in map(Requirement, metadata.distribution(name).requires or ())
            if r.marker is None or r.marker.evaluate(box)]


def box_names(python: str) -> set[str]:
    """What an ML image with torch has: ON_THE_BOX and everything they require, by name, read
    from this machine's installed metadata (names, not versions: builds differ, e.g. torch's
    +cpu here; resolving the box's torch would read its 800 MB wheel for its metadata)."""
    seen, todo = set(), [_norm(n) for n in ON_THE_BOX]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += _requires(name, python)
        except metadata.PackageNotFoundError:
            pass
    return seen


def dependency_wheels(wheels: Path, python: str) -> tuple[list[str], list[str]]:
    """Download the wheels of WANTED and their dependencies, less what the box has;
    returns (kept, left out)."""
    box = box_names(python) - {_norm(name) for name in WANTED}
    # llm-siren's own wheel only: everything it needs is the box's (torch, transformers ...),
    # so its resolution would read torch's wheel for nothing; checked below by name
    wanted = resolve([f"{name}=={metadata.version(name)}" for name in WANTED if name != "llm-siren"], python)
    wanted.update(resolve([f"llm-siren=={metadata.version('llm-siren')}"], python, deps=False))
    missing = set(_requires("llm-siren", python)) - box - set(wanted)
    if missing:
        raise SystemExit(f"make_kit: llm-siren needs {', '.join(sorted(missing))}, neither on the box nor in the kit")
    keep = sorted(f"{n}=={v}" for n, v in wanted.items() if n not in box and not n.startswith("nvidia-"))
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels),
                    *wheel_platform_args(python), *keep], check=True)
    return keep, sorted(box)


def tiny_model(kit: Path) -> None:
    """The tiny random streaming bundle: 2 layers 16 wide (the 151,936-row embedding and the
    tokenizer are most of its ~28 MB). llm-siren's model is made on the box."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from _models import build
    with tempfile.TemporaryDirectory() as tmp:
        _, bundle = build("micro", Path(tmp), max_length=512, neurons_per_layer=8)
        shutil.copytree(bundle, kit / "bundle")


def project_wheel(wheels: Path) -> None:
    """This project's wheel, built from a copy of what the wheel is made of (pyproject.toml, the
    README and the package folders): setuptools stages a build inside the source tree (build/,
    *.egg-info), so the checkout is left exactly as it was, also while another build runs in it."""
    try:
        import tomllib
    except ImportError:                                   # Python 3.10
        import tomli as tomllib
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "siren-deploy"
        source.mkdir()
        for name in ("pyproject.toml", config["project"]["readme"]):
            shutil.copy2(ROOT / name, source / name)
        for folder in set(config["tool"]["setuptools"]["package-dir"].values()):
            shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "-w", str(wheels), str(source)], check=True)


def size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2 ** 20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", default=str(ROOT / "dist" / "gpu-check"))
    parser.add_argument("--python", default=BOX_PYTHON,
                        help=f"the box's Python, MAJOR.MINOR (default {BOX_PYTHON}, the GPU box we are lent)")
    args = parser.parse_args()
    kit = Path(args.out)
    if kit.exists():
        shutil.rmtree(kit)
    wheels = kit / "wheels"
    wheels.mkdir(parents=True)
    print(f"building the siren-deploy wheel ...", file=sys.stderr)
    project_wheel(wheels)
    print(f"downloading wheels for Python {args.python} ...", file=sys.stderr)
    pins, left_out = dependency_wheels(wheels, args.python)
    print("exporting the tiny random bundle ...", file=sys.stderr)
    tiny_model(kit)
    for name in ("check.py", "torch_engine.py", "run.sh"):
        shutil.copy2(HERE / name, kit / name)
    shutil.copy2(ROOT / "tests" / "trt_standin.py", kit / "trt_standin.py")
    shutil.copy2(ROOT / "benchmarks" / "_models.py", kit / "_models.py")      # the model dimensions
    (kit / "kit.json").write_text(json.dumps({"python": args.python, "wheels": pins,
                                              "left_out": left_out}, indent=1))
    total = size_mib(kit)
    print(f"{kit}: {total:.1f} MiB ({size_mib(wheels):.1f} MiB of wheels, {len(list(wheels.iterdir()))} files) "
          f"for Python {args.python}; copy it to the GPU box and run `bash run.sh`")
    if total > LIMIT_MIB:
        print(f"make_kit: the kit is over {LIMIT_MIB} MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

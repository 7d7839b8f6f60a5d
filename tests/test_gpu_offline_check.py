"""The offline GPU check (benchmarks/gpu_offline) runs end to end here: its kit is made with
one command and stays under 60 MiB; installed from the kit alone (pip --no-index) on a "box"
that has only torch and what torch brings, its --cpu-substitute mode runs every check, the
device-KV path on the CUDA stand-in included; without a GPU and without --cpu-substitute it
refuses clearly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: what an ML image with torch has (the kit leaves these and what they need out); tokenizers
#: stays off the box so the kit's own wheel is the one installed
BOX = ("torch", "transformers", "huggingface_hub", "safetensors", "numpy")


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-kit") / "kit"
    here = f"{sys.version_info.major}.{sys.version_info.minor}"          # the only Python this machine has
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_offline" / "make_kit.py"), "-o", str(out),
                           "--python", here], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-2500:]
    return out, proc.stdout


def box_distributions() -> set[str]:
    """BOX and everything they require here (markers evaluated), tokenizers left out."""
    from packaging.requirements import Requirement
    seen, todo = set(), list(BOX)
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in seen or name == "tokenizers":
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for line in dist.requires or ():
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def torch_box(folder: Path) -> Path:
    """An ML image's packages (torch, transformers ...), as symlinks into this environment:
    on PYTHONPATH, the preinstalled packages of a CUDA box, and nothing of this project."""
    folder.mkdir()
    for name in box_distributions():
        dist = metadata.distribution(name)
        for top in {str(f).split("/")[0] for f in dist.files or ()} - {".."}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    return folder


def test_kit_is_small_and_complete(kit):
    folder, said = kit
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2 ** 20
    assert size < 60, said
    names = {p.name.split("-")[0].lower() for p in (folder / "wheels").iterdir()}
    assert {"siren_deploy", "onnxruntime", "tokenizers", "llm_siren"} <= names
    assert not names & {"torch", "numpy", "transformers", "nvidia_cublas_cu12"}          # the box has those
    for name in ("check.py", "run.sh", "trt_standin.py", "bundle/siren_bundle.json"):
        assert (folder / name).is_file(), name
    assert "MiB" in said


def box_python(tmp_path: Path) -> Path:
    """The GPU box's python3 as it is there: itself a virtual environment, torch and the rest
    installed in it (here: its site-packages points at this environment's copies)."""
    import venv
    root = tmp_path / "box-venv"
    venv.EnvBuilder(with_pip=True).create(root)
    python = root / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "box_packages.pth").write_text(str(torch_box(tmp_path / "box")) + "\n")
    return python


def test_cpu_substitute_runs_end_to_end_from_the_kit_alone(kit, tmp_path):
    folder, _ = kit
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    python = box_python(tmp_path)
    env.update(PYTHON=str(python), SIREN_CHECK_SITE=str(tmp_path / "site"), PIP_NO_INDEX="1", HF_HUB_OFFLINE="1")
    out = tmp_path / "result.json"
    proc = subprocess.run(["bash", str(folder / "run.sh"), "--cpu-substitute", "--json", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["device_kv"]
    assert [r["streams"] for r in rows] == [1, 8, 64]
    assert all(r["max_abs_diff"] <= 1e-5 and r["passed"] for r in rows)
    # the same most calls per step at 8 and 64 streams (the stand-in counts every call the runner makes)
    most = {max(r["host_calls_per_step"]) for r in rows if r["streams"] > 1}
    assert len(most) == 1 and all(r["calls_constant"] for r in rows) and 0 < most.pop() <= 12
    assert rows[-1]["device_mib_held"] > rows[0]["device_mib_held"] > 0
    assert len(result["anchor"]["rows"]) == 7 and all(r["ms"] > 0 for r in result["anchor"]["rows"])
    # torch as the step engine (1/4/16 streams on the substitute, 1/16/64 on a GPU): every KV
    # precision x stream count x copy path, exact against llm-siren and a whole-prefix
    # recompute; the 3-D path's copy entries grow with streams only
    engine = result["torch_engine"]["rows"]
    assert len(engine) == 2 * 3 * 3 and all(r["passed"] and r["entries_o_streams"] for r in engine)
    assert all(r["score_diff_vs_llm_siren"] <= 1e-5 and r["kv_rel_diff_vs_recompute"] <= 1e-5
               for r in engine if r["kv_dtype"] == "fp32")
    entries = {(r["kv_dtype"], r["streams"], r["path"]): r["entries_per_step"] for r in engine}
    assert entries[("fp32", 16, "3-D batch")] <= 3 * 16 + 6 < entries[("fp32", 16, "row batch")]
    assert all(r["device_mib_after_close"] == 0 for r in engine)
    assert "| 16 streams, 3-D batch | bf16 |" in proc.stdout
    trt = result["tensorrt"]          # the stand-in's TensorRT: built, gated, timed
    assert trt["ran"] and trt["passed"] and trt["engines"] == ["model", "streaming"] and len(trt["rows"]) == 3
    assert result["passed"] and "| 64 streams, 6 feeds |" in proc.stdout and "PASS in" in proc.stdout
    # installed from the kit, beside the box's packages: not from this checkout, not over the box
    import_path = subprocess.run([str(python), "-c", "import siren_runtime, torch; print(siren_runtime.__file__); "
                                  "print(torch.__file__)"], env={**env, "PYTHONPATH": str(tmp_path / "site")},
                                 capture_output=True, text=True, cwd=tmp_path).stdout.splitlines()
    assert import_path[0].startswith(str(tmp_path / "site")) and not import_path[1].startswith(str(tmp_path / "site"))


def test_the_default_kit_is_for_the_boxs_python_312(tmp_path):
    """`make gpu-kit` builds for Python 3.12 (the box we are lent), from a 3.11 machine: every
    wheel installs on CPython 3.12 manylinux x86_64, and what the box has is left out by name
    (this machine's torch is a +cpu build that does not exist for the box)."""
    out = tmp_path / "kit"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_offline" / "make_kit.py"), "-o", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-2500:]
    recorded = json.loads((out / "kit.json").read_text())
    assert recorded["python"] == "3.12" and {"torch", "numpy", "transformers"} <= set(recorded["left_out"])
    for wheel in (out / "wheels").iterdir():
        python_tag, abi_tag, platform = wheel.name[:-len(".whl")].split("-")[-3:]
        pythons = python_tag.split(".")
        assert "py3" in pythons or "cp312" in pythons or (abi_tag == "abi3" and any(
            p.startswith("cp3") and int(p[3:]) <= 12 for p in pythons)), wheel.name
        assert platform == "any" or ("manylinux" in platform and platform.endswith("x86_64")), wheel.name
    assert "Python 3.12" in proc.stdout


def test_without_a_gpu_it_refuses_clearly(kit):
    folder, _ = kit
    proc = subprocess.run([sys.executable, str(folder / "check.py"), "--kit", str(folder)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--cpu-substitute" in proc.stderr and ("GPU" in proc.stderr or "cuda-bindings" in proc.stderr)

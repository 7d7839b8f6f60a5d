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
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_offline" / "make_kit.py"), "-o", str(out)],
                          capture_output=True, text=True, timeout=1200)
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


def test_cpu_substitute_runs_end_to_end_from_the_kit_alone(kit, tmp_path):
    folder, _ = kit
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env.update(PYTHONPATH=str(torch_box(tmp_path / "box")), PYTHON=sys._base_executable,
               SIREN_CHECK_VENV=str(tmp_path / "venv"), PIP_NO_INDEX="1", HF_HUB_OFFLINE="1")
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
    trt = result["tensorrt"]          # the stand-in's TensorRT: built, gated, timed
    assert trt["ran"] and trt["passed"] and trt["engines"] == ["model", "streaming"] and len(trt["rows"]) == 3
    assert result["passed"] and "| 64 streams, 6 feeds |" in proc.stdout and "PASS in" in proc.stdout
    # installed from the kit, not from this checkout
    import_path = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c",
                                  "import siren_runtime; print(siren_runtime.__file__)"],
                                 env=env, capture_output=True, text=True, cwd=tmp_path).stdout
    assert str(tmp_path / "venv") in import_path


def test_without_a_gpu_it_refuses_clearly(kit):
    folder, _ = kit
    proc = subprocess.run([sys.executable, str(folder / "check.py"), "--kit", str(folder)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "--cpu-substitute" in proc.stderr and ("GPU" in proc.stderr or "cuda-bindings" in proc.stderr)

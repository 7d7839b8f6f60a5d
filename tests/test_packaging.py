"""The wheel users install: every package and its data present, typed, no setuptools warnings."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("siren_runtime", "siren_export", "siren_engines", "siren_serving", "siren_cli", "siren_quantize")


def test_wheel_contents_and_no_setuptools_warnings(tmp_path):
    had_build = (ROOT / "build").exists()
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                               "-w", str(tmp_path), "-v"], capture_output=True, text=True, timeout=600)
    finally:
        if not had_build:               # setuptools' staging copy, not part of the checkout
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "absent from the `packages` configuration" not in output and "Package would be ignored" not in output
    [wheel] = tmp_path.glob("siren_deploy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGES:
        assert f"{package}/py.typed" in names, package
    for required in ("siren_runtime/data/calibration.txt", "siren_serving/triton_models/stream_model.py",
                     "siren_serving/triton_models/scorer_model.py", "siren_serving/server.py", "siren_cli/main.py"):
        assert required in names, required
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "siren = siren_cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

"""`siren demo`, the README's main job, runs end to end with no network."""
from __future__ import annotations

import os
import subprocess
import sys


def test_demo_runs_offline(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "siren_cli", "demo", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "RANDOM-WEIGHT DEMO MODEL" in out and "torch loaded: False" in out
    rows = [l for l in out.splitlines() if l.strip() and l.strip()[0].isdigit() and "." in l.split()[0]]
    assert len(rows) == 5
    assert all(0.0 <= float(r.split()[0]) <= 1.0 for r in rows)
    assert (tmp_path / "bundle" / "siren_bundle.json").is_file()

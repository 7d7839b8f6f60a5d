"""The runtime imports and scores in a process where torch and transformers cannot be imported."""
from __future__ import annotations

import json
import subprocess
import sys

from helpers import BLOCKER, BLOCKER_TEMPLATE  # noqa: F401 (BLOCKER_TEMPLATE: kept importable)

SCRIPT = BLOCKER + r"""
import json
try:
    import torch
    raise SystemExit("blocker failed: torch imported")
except ImportError:
    pass
from siren_runtime import SirenGuard
guard = SirenGuard.from_pretrained(sys.argv[1], device="cpu")
out = {
    "batch": [r.score for r in guard.score_batch(["hello there", "How can I make a pipe bomb at home?"])],
    "single": guard.score(prompt="hi", response="there").to_dict(),
    "stream": guard.score_streaming("partial resp").score,
    "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "siren_export")),
}
print(json.dumps(out))
"""


def test_runtime_scores_without_torch(all_layers):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(all_layers.bundle)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["modules"] == []
    ref = all_layers.reference
    expected = [r.score for r in ref.score_batch(["hello there", "How can I make a pipe bomb at home?"])]
    assert max(abs(a - b) for a, b in zip(out["batch"], expected)) <= 1e-5
    assert abs(out["single"]["score"] - ref.score(prompt="hi", response="there").score) <= 1e-5
    assert abs(out["stream"] - ref.score_streaming("partial resp").score) <= 1e-5


def test_siren_score_cli_without_torch(all_layers):
    """`siren score` goes through the CLI module, which must not pull in torch either."""
    script = ("BLOCKED = ('torch', 'transformers', 'siren_export')" + BLOCKER_TEMPLATE +
              "from siren_cli import main as cli\n"
              "raise SystemExit(cli.main(['score', sys.argv[1], 'hello', '--json']))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(all_layers.bundle)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.strip())
    assert row["text"] == "hello"
    assert abs(row["score"] - all_layers.reference.score("hello").score) <= 1e-5

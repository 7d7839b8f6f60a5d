#!/usr/bin/env bash
# The offline GPU check, from its kit (make gpu-kit), on a box with torch+CUDA, cuda-bindings,
# transformers and numpy (an ML image) but no network:
#   bash run.sh [--cpu-substitute] [--full] [--json OUT]
# Makes a virtual environment that sees the box's own packages (torch stays the box's),
# installs only from the kit's wheels (never the network), and runs check.py.
# PYTHON picks the interpreter (default python3; the kit's wheels are for kit.json's Python).
set -euo pipefail
KIT="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3}"
VENV="${SIREN_CHECK_VENV:-$KIT/.venv}"
want="$(sed -n 's/.*"python": "\([0-9.]*\)".*/\1/p' "$KIT/kit.json")"
have="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
if [[ "$want" != "$have" ]]; then
  echo "run.sh: the kit's wheels are for Python $want, $PY is $have (PYTHON=python$want bash run.sh)" >&2
  exit 2
fi
"$PY" -c 'import torch, numpy, transformers, safetensors' 2>/dev/null || {
  echo "run.sh: this check needs torch, numpy, transformers and safetensors on the box ($PY cannot import them all)" >&2
  exit 2; }
"$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/python" -m pip install --quiet --no-index --find-links "$KIT/wheels" \
  siren-deploy onnxruntime tokenizers llm-siren
exec "$VENV/bin/python" "$KIT/check.py" --kit "$KIT" "$@"

#!/usr/bin/env bash
# The offline GPU check, from its kit (make gpu-kit), on a box with torch+CUDA, cuda-bindings,
# transformers and numpy (an ML image) but no network:
#   bash run.sh [--cpu-substitute] [--full] [--json OUT]
# Installs the kit's wheels beside what the box has, never over it and never in a nested
# environment: `pip install --target` into the kit's own folder, put first on PYTHONPATH for
# check.py alone (on such boxes python3 is often itself a virtual environment holding torch; a
# venv made from it would not see torch). Nothing comes from the network (--no-index).
# PYTHON picks the interpreter (default python3; the kit's wheels are for kit.json's Python).
set -euo pipefail
KIT="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3}"
SITE="${SIREN_CHECK_SITE:-$KIT/site}"
want="$(sed -n 's/.*"python": "\([0-9.]*\)".*/\1/p' "$KIT/kit.json")"
have="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
if [[ "$want" != "$have" ]]; then
  echo "run.sh: the kit's wheels are for Python $want, $PY is $have (PYTHON=python$want bash run.sh)" >&2
  exit 2
fi
"$PY" -c 'import torch, numpy, transformers, safetensors' 2>/dev/null || {
  echo "run.sh: this check needs torch, numpy, transformers and safetensors on the box ($PY cannot import them all)" >&2
  exit 2; }
if [[ ! -f "$SITE/.installed" ]]; then
  rm -rf "$SITE"
  "$PY" -m pip install --quiet --quiet --no-index --no-deps --disable-pip-version-check --target "$SITE" \
    "$KIT"/wheels/*.whl
  touch "$SITE/.installed"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" "$KIT/check.py" --kit "$KIT" "$@"

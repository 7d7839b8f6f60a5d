#!/usr/bin/env bash
# GPU check, one command (< 10 minutes) on a machine with an NVIDIA GPU:
#   benchmarks/gpu_check.sh [--full]
# Installs the project with its tensorrt/export/test extras into .venv-gpu (the CUDA 12 pair;
# SIREN_TRT_EXTRA=tensorrt-cu13 for a CUDA 13 driver), swaps ONNX Runtime's CPU wheel for
# onnxruntime-gpu, runs the `gpu` tests (build, load, parity, streaming on the step engine),
# builds fp32 and bf16 engines (model + streaming step) for a tiny random model (and one at
# Qwen3-4B dimensions with --full), runs `siren verify`, and prints latency/throughput for
# batch 1/8/32 x sequence 64/256 and for 1/16/64 concurrent streams with TensorRT, ONNX Runtime
# CUDA and llm-siren on torch CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
FULL=()
[[ "${1:-}" == "--full" ]] && FULL=(--full)
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader || {
  echo "gpu_check: no NVIDIA GPU visible (nvidia-smi failed)" >&2; exit 2; }
python3 -m venv .venv-gpu
. .venv-gpu/bin/activate
pip install --quiet --upgrade pip
# torch from the index is a CUDA build on GPU machines; TensorRT 10.12+/11.x from PyPI.
pip install --quiet -e ".[${SIREN_TRT_EXTRA:-tensorrt},export,test]"
pip uninstall --quiet -y onnxruntime && pip install --quiet onnxruntime-gpu   # one ONNX Runtime wheel only
python -m pytest -q -m gpu tests/test_engines_gpu.py
python benchmarks/gpu_latency.py --workdir "${SIREN_GPU_WORKDIR:-/tmp/siren-gpu}" "${FULL[@]}"

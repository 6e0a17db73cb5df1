#!/usr/bin/env bash
# Create the virtual environment and install robustsparse with everything it needs (idempotent).
#   TORCH_SPEC  which torch to install first (default torch==2.13.0, the CPU build; e.g. TORCH_SPEC=torch for CUDA)
set -euo pipefail
VENV=${1:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
cd "$(dirname "$0")/.."
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first, pinned: the project's range (torch>=2.1) is then satisfied and pip installs no second build.
"${PIP[@]}" "$TORCH_SPEC"
# deploy (onnx, onnxruntime: the ONNX export and its tests) pinned to the versions the tests ran with; neither
# depends on torch, so the CPU build above stays.
"${PIP[@]}" -e ".[test,deploy]" "onnx==1.23.2" "onnxruntime==1.32.0"
# torchattacks supplies AutoAttack's components. --no-deps: its metadata asks for torchvision (never imported, and it
# would replace the CPU torch with a CUDA build) and requests~=2.25 (never used by the attacks we call).
"${PIP[@]}" --no-deps "torchattacks==3.5.1"
"$VENV/bin/python" -c "import robustsparse, torchattacks, torch, onnxruntime; print('robustsparse', robustsparse.__version__, 'torch', torch.__version__, 'onnxruntime', onnxruntime.__version__)"
touch "$VENV/.installed"

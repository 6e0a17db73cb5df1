#!/usr/bin/env bash
# Create the virtual environment and install robustsparse with everything it needs (idempotent).
#   TORCH_SPEC  which torch to install first (default torch==2.13.0, the CPU build; e.g. TORCH_SPEC=torch for CUDA)
# Also installs Fashion-MNIST (Debian's dataset-fashion-mnist: the four IDX .gz files in FMNIST_DIR, the default
# root of the `fashion_mnist` dataset) with apt-get when run as root; otherwise it says in one line how to get it.
set -euo pipefail
VENV=${1:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
FMNIST_DIR=/usr/share/datasets/fashion-mnist
cd "$(dirname "$0")/.."

fmnist_installed() {
  local f
  for f in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
    [ -f "$FMNIST_DIR/$f.gz" ] || [ -f "$FMNIST_DIR/$f" ] || return 1
  done
}
if ! fmnist_installed; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing Fashion-MNIST (apt-get install dataset-fashion-mnist, ~31 MB) into $FMNIST_DIR"
    # a failure here (no network, no such package) must not stop the Python set-up: the tests that need the files
    # then fail (CI) or skip with the fix in their message
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
      || echo "warning: could not install dataset-fashion-mnist with apt-get; fashion_mnist needs data.root" >&2
  else
    echo "note: Fashion-MNIST is not installed; get it with \`sudo apt-get install dataset-fashion-mnist\` (Debian/Ubuntu) or pass data.root=<folder with the IDX files>" >&2
  fi
fi
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

#!/usr/bin/env bash
# The GPU path, end to end, in one command (budget: <= 8 minutes on one H200).
#
#   scripts/gpu_check.sh --prepare   # here, with network: fill gpu_carry/ (git-ignored) with what the GPU lacks
#   scripts/gpu_check.sh             # on the GPU machine (python3 + torch with CUDA, no network)
#   scripts/gpu_check.sh --dry-run   # on any CPU: the same sequence at tiny sizes (tests/test_gpu_check.py)
#
# gpu_carry/ (git-ignored, about 40 MB) holds wheels/ and fashion-mnist/ (the four IDX files, copied from
# /usr/share/datasets/fashion-mnist or $FASHION_MNIST). wheels/: what a bare torch+CUDA image may lack, for CPython
# 3.10-3.13 (the GPU's Python is not known here): torchattacks 3.5.1, tqdm, PyYAML, safetensors (abi3), pytest and
# its dependencies. On the GPU the modules that are missing are installed from them into $OUT/site by unpacking
# the compatible wheel (no pip, no index). matplotlib, tensorboard, scipy and scikit-learn are not carried (too
# large for the 64 MiB the tree may carry): without them plots and TensorBoard are skipped, nothing else.
# Steps, each with its own time limit, logs and JSON under $OUT (or gpu_out/ if OUT is unset):
#   1. tests/test_cuda.py (AMP, channels_last, compile, masks exact, one-process NCCL DDP, fp32 evaluator)
#   2. bench: ResNet-18 3x32x32 PGD-10, batch 512: ours (bf16, channels_last, compile) vs skilled and textbook fp32
#   3. one complete Fashion-MNIST PGD-AT run (cnn width 32, 2 epochs) and its evaluation (clean, PGD-20, AutoAttack
#      on the first 1000 test points)
# The exit status is the number of failed steps; summary.json lists each step's status and seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
CARRY=gpu_carry
OUT=${OUT:-gpu_out}
PY=${PYTHON:-python3}

if [ "$MODE" = "--prepare" ]; then
  set -e
  mkdir -p "$CARRY/wheels"
  PIPDL="${PIP:-.venv/bin/python -m pip} download --no-deps --quiet --only-binary=:all: -d $CARRY/wheels"
  $PIPDL "torchattacks==3.5.1" "tqdm==4.67.1" "pytest==8.3.5" "pluggy==1.5.0" "iniconfig==2.1.0" "packaging==25.0" \
    "exceptiongroup==1.3.0" "typing_extensions==4.14.0"
  for v in 310 311 312 313; do  # compiled: one wheel per CPython (safetensors' abi3 wheel serves them all)
    $PIPDL --platform manylinux_2_17_x86_64 --python-version "$v" --implementation cp "PyYAML==6.0.2"
    $PIPDL --platform manylinux_2_17_x86_64 --python-version "$v" --implementation cp "safetensors==0.5.3"
  done
  $PIPDL --platform manylinux_2_17_x86_64 --python-version 310 --implementation cp "tomli==2.2.1"  # pytest on 3.10
  SRC=${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
  if [ -d "$SRC" ]; then
    mkdir -p "$CARRY/fashion-mnist" && cp "$SRC"/*-ubyte* "$CARRY/fashion-mnist/"
  else
    echo "no Fashion-MNIST at $SRC: step 3 will be skipped on the GPU" >&2
  fi
  ls "$CARRY/wheels"
  du -sh "$CARRY"
  exit 0
fi

mkdir -p "$OUT"
if [ "$MODE" = "--dry-run" ]; then
  PY=${PYTHON:-.venv/bin/python}
  DEVICE=cpu; TESTS_LIMIT=120; BENCH=(--model cnn --model-option width=4 --input-shape 1,8,8 --batch 8 --steps 2
    --iters 2 --warmup 1 --repeats 2 --amp bf16 --channels-last)
  TRAIN=(digits_pgdat "model.options={width: 4}" train.epochs=1 attack.steps=1 train.val_attack_steps=1
    train.batch_size=256 data.val_size=40); EVAL=(--suite clean,pgd-2 --n 32)
  BENCH_LIMIT=120; TRAIN_LIMIT=120; EVAL_LIMIT=120
else
  DEVICE=cuda; TESTS_LIMIT=110; BENCH_LIMIT=140; TRAIN_LIMIT=90; EVAL_LIMIT=130  # 470 s in all
  BENCH=(--model resnet18 --input-shape 3,32,32 --batch 512 --steps 10 --iters 5 --warmup 2 --repeats 3 --amp bf16
    --channels-last --compile)
  TRAIN=(digits_pgdat data.name=fashion_mnist "data.root=$CARRY/fashion-mnist" data.crop_padding=0
    "model.options={width: 32}" train.epochs=2 train.batch_size=128 train.lr=0.05 attack.eps=0.1)
  EVAL=(--suite clean,pgd-20,autoattack --n 1000)
  export ROBUSTSPARSE_CUDA_TESTS_REQUIRED=1
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

# What the machine lacks, from the carried wheels: a wheel is a zip, so unpacking the one whose tags fit this
# Python into a folder on PYTHONPATH installs it (none of these needs an entry point or a build step).
if [ -d "$CARRY/wheels" ]; then
  $PY scripts/install_carried_wheels.py "$CARRY/wheels" "$OUT/site" && export PYTHONPATH="$PYTHONPATH:$PWD/$OUT/site"
fi

STATUS=()
step() {  # step NAME LIMIT_S COMMAND...: run it with a time limit, log to $OUT/NAME.log, record status and seconds
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/steps.log"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 15 "$OUT/$name.log"
  STATUS+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}")
  echo "== $name: rc=$rc in $((SECONDS - start))s" | tee -a "$OUT/steps.log"
}

$PY - > "$OUT/machine.json" 2>&1 <<'EOF'
import importlib, json, torch
missing = []  # what the machine lacks: the first GPU session learns it here, before a step fails on it
for name in ("numpy", "scipy", "sklearn", "safetensors", "yaml", "tqdm", "matplotlib", "tensorboard", "torchattacks",
             "pytest"):
    try:
        importlib.import_module(name)
    except ImportError:
        missing.append(name)
from robustsparse.runs.machine import device_peak
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(dev),
                  "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                  "peak": device_peak(dev), "missing_modules": missing}, indent=1))
EOF
if [ "$MODE" = "--dry-run" ]; then
  step cuda_tests "$TESTS_LIMIT" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs
else
  # test_precision's runs train on digits (scikit-learn); without it only the CUDA tests run
  PRECISION=tests/test_precision.py; $PY -c "import sklearn" 2>/dev/null || PRECISION=
  step cuda_tests "$TESTS_LIMIT" $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py $PRECISION
fi
step bench "$BENCH_LIMIT" $PY -m robustsparse bench "${BENCH[@]}" --device "$DEVICE" --json "$OUT/bench.json" --no-progress
# AutoAttack's components come from torchattacks, whose package import needs scipy (not carried: too large):
# without it the evaluation is clean + PGD-20, and summary.json says so
if ! $PY -c "import torchattacks" 2>/dev/null; then
  EVAL=(--suite clean,pgd-20 "${EVAL[@]:2}")
  STATUS+=("{\"step\": \"autoattack\", \"rc\": null, \"skipped\": \"torchattacks not importable (scipy missing?)\"}")
fi
if [ "$MODE" = "--dry-run" ] || [ -d "$CARRY/fashion-mnist" ]; then
  rm -rf "$OUT/run"
  step train "$TRAIN_LIMIT" $PY -m robustsparse train "${TRAIN[@]}" "train.device=$DEVICE" --out "$OUT/run" --no-progress
  export EVAL_JSON="$OUT/eval.json"  # stdout is the JSON result; the log gets stderr
  step eval "$EVAL_LIMIT" bash -c 'exec "$@" > "$EVAL_JSON"' _ $PY -m robustsparse eval "$OUT/run" "${EVAL[@]}" \
    --json --no-progress
else
  STATUS+=("{\"step\": \"train\", \"rc\": null, \"skipped\": \"no $CARRY/fashion-mnist\"}")
fi

FAILED=0
for s in "${STATUS[@]}"; do case "$s" in *'"rc": 0,'*|*'"rc": null'*) ;; *) FAILED=$((FAILED + 1)) ;; esac; done
(IFS=,; echo "{\"mode\": \"$MODE\", \"failed\": $FAILED, \"steps\": [${STATUS[*]}]}") > "$OUT/summary.json"
cat "$OUT/summary.json"
exit "$FAILED"

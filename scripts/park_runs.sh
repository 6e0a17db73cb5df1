#!/usr/bin/env bash
# Park resumable state of long runs in the repo (a machine may not survive its session): records of every run, best weights of
# finished runs, the last checkpoint of unfinished ones, sweep and eval states (no tensorboard). Usage: scripts/park_runs.sh SRC DST
# e.g. scripts/park_runs.sh /work/study/ofa docs/results/raw/fmnist-study/ofa; resume: cp -rn DST/. SRC/ and rerun the command.
set -eu
src=$1; dst=$2
(cd "$src" && find . -type f ! -path '*/tensorboard/*' ! -name '*.tmp' -print0) | while IFS= read -r -d '' f; do
  run=$(dirname "$(dirname "$f")")
  case "$f" in
    */checkpoints/best.*) ;;                                    # weights of the model that is evaluated
    */checkpoints/last.json) ;;
    */checkpoints/last.*.safetensors)                           # only while the run is unfinished
      grep -q '"finished"' "$src/$run/run.json" 2>/dev/null && continue ;;
    */checkpoints/*) continue ;;
    *.safetensors) ;;                                          # ticket / search state weights
  esac
  mkdir -p "$dst/$(dirname "$f")"; cp "$src/$f" "$dst/$f"
done

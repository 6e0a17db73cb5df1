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
# A parked copy holds only the weights its handles name: drop those of earlier parks (a best that was replaced, the last
# checkpoint of a run that has since finished, an older search state), so the repository does not keep every intermediate state.
find "$dst" -type d \( -name checkpoints -o -name search-state \) -print0 | while IFS= read -r -d '' ck; do
  run=$(dirname "$ck"); src_run=$src/${run#"$dst"/}
  # a finished prune deletes its search state: so does its parked copy
  if [ "$(basename "$ck")" = search-state ] && [ ! -d "$src_run/search-state" ]; then rm -rf "$ck"; continue; fi
  finished=$(grep -q '"finished"' "$src_run/run.json" 2>/dev/null && echo 1 || echo 0)
  keep=$(cat "$ck"/*.json 2>/dev/null | grep -o '"weights": *"[^"]*"' | sed 's/.*"\([^"]*\)"$/\1/')
  for w in "$ck"/*.safetensors; do
    [ -e "$w" ] || continue
    name=$(basename "$w")
    if ! printf '%s\n' $keep | grep -qx "$name" || { [ "$finished" = 1 ] && [ "${name#last.}" != "$name" ]; }; then rm -f "$w"; fi
  done
done

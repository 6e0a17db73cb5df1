#!/usr/bin/env bash
# SMART mechanism check: one random 50% subnet (the density of each SMART expert), trained alone on full batches,
# standard and PGD-AT, fp32, seed 0 -- what a SMART expert could reach without sharing the batch, the loss and the classifier.
set -u; cd /work/main; export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE; rs=.venv/bin/robustsparse; D=/work/diag/rand50
[ -f $D/ticket/ticket.json ] || { rm -rf $D/ticket; $rs prune fmnist_pgdat --method random --density 0.5 prune.seed=0 --out $D/ticket --no-progress; }
for m in standard pgd_at; do
  R=$D/$m
  if ! grep -q '"finished"' $R/run.json 2>/dev/null; then
    if [ -f $R/checkpoints/last.json ]; then $rs train --resume --out $R --no-progress
    else rm -rf $R; $rs train fmnist_pgdat train.method=$m train.amp=fp32 train.checkpoint_every_steps=100 --ticket $D/ticket --out $R --no-progress; fi
  fi
  $rs eval $R --suite clean,pgd-20 --state $R/eval-state.json --json --no-progress > $R/eval-protocol.json
done
date

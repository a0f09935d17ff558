#!/usr/bin/env bash
# Crash check for `megamoe train`: N runs killed with SIGKILL at random moments
# during `train --set train.checkpoint_every=5 --steps 40`, each resumed with
# `--resume`, must give the step losses of an uninterrupted run, bit for bit, with
# one metrics record per step.
#   usage: tools/kill_resume_check.sh [MEGAMOE_BINARY] [N=20] [EXTRA train args...]
set -euo pipefail
bin=${1:-megamoe}; n=${2:-20}; shift $(( $# > 2 ? 2 : $# )) || true
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
args=(train --set train.checkpoint_every=5 --steps 40 --sample-tokens 0 "$@")
losses() { python3 -c '
import json,sys,collections
c=collections.Counter(); l={}
for line in open(sys.argv[1]):
    r=json.loads(line)
    if r["kind"]=="step": c[r["step"]]+=1; l[r["step"]]=r["loss"]["total"]
dup=[s for s in c if c[s]!=1]
print("DUP" if dup else "", *[repr(l[s]) for s in sorted(l)])' "$1/metrics.jsonl"; }
start=$(date +%s.%N)
"$bin" "${args[@]}" --run-dir "$work/straight" >/dev/null 2>&1
full=$(python3 -c "print($(date +%s.%N)-$start)")
want=$(losses "$work/straight")
ok=0
for i in $(seq 1 "$n"); do
  delay=$(python3 -c "import random; print(round(random.uniform(0.05, $full), 3))")
  "$bin" "${args[@]}" --run-dir "$work/r$i" >/dev/null 2>&1 & pid=$!
  sleep "$delay"; kill -9 "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
  at=$(grep -c '"kind":"step"' "$work/r$i/metrics.jsonl" 2>/dev/null || true)
  ckpts=$( (ls "$work/r$i/checkpoints" 2>/dev/null || true) | tr '\n' ' ')
  if [ ! -e "$work/r$i" ]; then
    ok=$((ok+1)); verdict="ok (killed before the run dir existed: nothing to resume)"
  elif "$bin" train --resume "$work/r$i" --steps 40 --sample-tokens 0 >"$work/r$i.log" 2>&1 \
     && [ "$(losses "$work/r$i")" = "$want" ]; then
    ok=$((ok+1)); verdict=ok
  else
    verdict="FAIL ($(tail -1 "$work/r$i.log"))"
  fi
  echo "kill $i after ${delay}s (step records: $at; checkpoints: ${ckpts:-none}): $verdict"
done
echo "$ok of $n killed runs resumed to the uninterrupted losses with one record per step"
[ "$ok" = "$n" ]

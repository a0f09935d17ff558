#!/usr/bin/env bash
# `mpirun … train --resume` continues a dp2 x ep2 run (4 processes) with the losses of the
# uninterrupted run, bit for bit and one metrics record per step. Two interruptions:
#   stop  the run ends at step 4 (--steps 4; its final checkpoint is step 4), then
#         `mpirun -n 4 … --resume RUN --steps 8`;
#   kill  the run (checkpoints every 2 steps) has rank 1 killed with SIGKILL once step 5
#         is logged (mpirun then ends the job), then `mpirun -n 4 … --resume RUN --steps 8`
#         continues from the newest checkpoint (metrics after it are cut back);
#   relayout  stopped at step 4 as `stop`, resumed under another layout of 4 processes,
#         dp2 x pp2 (1F1B) with parallel.fsdp=2: the same losses up to summation order
#         (≤ 1e-5 relative) instead of bit for bit.
# Each is compared with one uninterrupted `mpirun -n 4 … --steps 8` run.
#
#   tools/mpi_resume.sh target/release/megamoe [stop|kill|relayout]
#
# BIN must be built with `--features mpi`. MPIRUN overrides the launcher (default `mpirun`).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 BIN [stop|kill]" >&2
  exit 2
fi
BIN=$(realpath "$1")
shift
MODES=("$@")
[ ${#MODES[@]} -gt 0 ] || MODES=(stop kill relayout)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export OMPI_MCA_rmaps_base_oversubscribe=${OMPI_MCA_rmaps_base_oversubscribe:-1}
read -r -a MPIRUN <<< "${MPIRUN:-mpirun}"
WORK=$(mktemp -d)
MPIRUN_PID=
cleanup() {
  [ -n "$MPIRUN_PID" ] && kill -9 "$MPIRUN_PID" 2> /dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"; [ -z "${KEEP:-}" ] || echo "kept $WORK"
}
trap cleanup EXIT
LAYOUT=(--set parallel.dp=2 --set parallel.ep=2)

# train LOG ARGS...: `mpirun -n 4 BIN train` on the tiny config under dp2 x ep2.
train() {
  local log=$1
  shift
  "${MPIRUN[@]}" -n 4 "$BIN" train --config "$ROOT/configs/tiny.toml" "${LAYOUT[@]}" \
    --peak-flops 1e11 --sample-tokens 0 "$@" > "$WORK/$log.log" 2>&1 || {
    echo "FAILED: $log (mpirun -n 4 megamoe train … $*):" >&2
    tail -20 "$WORK/$log.log" >&2
    exit 1
  }
}

# "step loss" per step record of run $1, and DUP first if a step has two records.
losses() {
  local recs
  recs=$(grep '"kind":"step"' "$WORK/$1/metrics.jsonl" |
    sed -E 's/.*"step":([0-9]+),"loss":\{"total":([^,}]+).*/\1 \2/')
  if [ "$(echo "$recs" | cut -d' ' -f1 | sort | uniq -d)" != "" ]; then echo DUP; fi
  echo "$recs"
}

alive() {
  local st
  st=$(cat "/proc/$1/stat" 2> /dev/null) || return 1
  st=${st##*) }
  [[ $st != Z* && $st != X* ]]
}
children() { cat /proc/"$1"/task/*/children 2> /dev/null || true; }
rank_pid() { # rank_pid MPIRUN_PID RANK
  local p
  for p in $(children "$1"); do
    if tr '\0' '\n' < "/proc/$p/environ" 2> /dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2"; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

t0=$(date +%s)
train straight --steps 8 --run-dir "$WORK/straight"
want=$(losses straight)
status=0
for mode in "${MODES[@]}"; do
  run="$WORK/$mode"
  case "$mode" in
    stop | relayout) train "$mode-first" --steps 4 --run-dir "$run" ;;
    kill)
      "${MPIRUN[@]}" -n 4 "$BIN" train --config "$ROOT/configs/tiny.toml" "${LAYOUT[@]}" \
        --set train.checkpoint_every=2 --peak-flops 1e11 --sample-tokens 0 --steps 8 \
        --run-dir "$run" > "$WORK/$mode-first.log" 2>&1 &
      MPIRUN_PID=$!
      until grep -q '"step":5,' "$run/metrics.jsonl" 2> /dev/null; do
        alive "$MPIRUN_PID" || { echo "FAILED (kill): the run ended before step 5" >&2; exit 1; }
        sleep 0.1
      done
      kill -9 "$(rank_pid "$MPIRUN_PID" 1)"
      wait "$MPIRUN_PID" 2> /dev/null || true
      MPIRUN_PID=
      ;;
    *) echo "unknown mode $mode (stop|kill|relayout)" >&2; exit 2 ;;
  esac
  at=$(grep -c '"kind":"step"' "$run/metrics.jsonl")
  ckpts=$(ls "$run/checkpoints" | grep -v latest | tr '\n' ' ')
  extra=()
  [ "$mode" = kill ] && extra=(--set train.checkpoint_every=2)
  [ "$mode" = relayout ] && extra=(--set parallel.ep=1 --set parallel.pp=2 --set parallel.fsdp=2
    --set parallel.microbatches=2 --set 'parallel.schedule="1f1b"')
  train "$mode-resumed" --resume "$run" "${extra[@]}" --steps 8
  got=$(losses "$mode")
  from=$(grep -m1 -o "steps [0-9]* -> 8" "$WORK/$mode-resumed.log" || true)
  rel=$(paste <(echo "$want") <(echo "$got") | awk '
    NF != 4 || $1 != $3 { bad = 1; next }
    { d = $4 - $2; if (d < 0) d = -d; r = d / ($2 < 0 ? -$2 : $2); if (r > m) m = r }
    END { if (bad) print "bad"; else printf "%.3e", m }')
  if [ "$got" = "$want" ]; then
    verdict="identical losses and one record per step (8)"
  elif [ "$mode" = relayout ] && [ "$rel" != bad ] && awk -v r="$rel" 'BEGIN { exit !(r <= 1e-5) }'; then
    verdict="same 8 steps, one record each, max rel loss diff $rel (bar 1e-5)"
  else
    verdict=FAILED
    status=1
    diff <(echo "$want") <(echo "$got") >&2 || true
  fi
  echo "$mode: interrupted with $at step records, checkpoints: ${ckpts}; resumed under mpirun -n 4 ($from): $verdict"
done
echo "mpi_resume: $(($(date +%s) - t0)) s"
exit $status

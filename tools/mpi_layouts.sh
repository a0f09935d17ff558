#!/usr/bin/env bash
# Layout invariance across processes: runs `mpirun -n N BIN train --config configs/tiny.toml
# --set … --steps 8` for each layout and compares rank 0's per-step losses (metrics.jsonl)
# with one process running the same micro-batches (same micro-batch size). Prints one line
# per layout with the largest relative difference; exits 1 if any is above 1e-5.
#
#   tools/mpi_layouts.sh target/release/megamoe                 # every layout
#   tools/mpi_layouts.sh target/release/megamoe dp2 pp2-1f1b    # a subset
#
# BIN must be built with `--features mpi`. Layouts: dp2 ep2 dp2xep2 tp2 dp2-fsdp2 dp2-fsdp3
# dp2xtp2-fsdp3 dp2xtp2-sp dp2xpp2-fsdp2 dp2xpp2-fsdp3 (ZB-H1) pp2xtp2 (DualPipeV) pp2-<schedule> (1f1b, gpipe, interleaved, zb-h1, zbv,
# dualpipev) dp2xep2xpp2.
# Each layout also runs as `--world N` thread ranks in one process: MPI must give the
# same losses bit for bit (both reduce in rank order).
# MPIRUN overrides the launcher (default `mpirun`); oversubscription is allowed (OpenMPI).
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 BIN [LAYOUT ...]   (dp2 ep2 dp2xep2 dp2-fsdp2 dp2-fsdp3 pp2-1f1b pp2-dualpipev ...)" >&2
  exit 2
fi
BIN=$(realpath "$1")
shift
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LAYOUTS=("$@")
[ ${#LAYOUTS[@]} -gt 0 ] || LAYOUTS=(dp2 ep2 dp2xep2 tp2 dp2-fsdp2 dp2-fsdp3 dp2xtp2-fsdp3 dp2xtp2-sp dp2xpp2-fsdp2 dp2xpp2-fsdp3 pp2xtp2 pp2-1f1b pp2-interleaved pp2-zb-h1 pp2-zbv pp2-dualpipev dp2xep2xpp2)
export OMPI_MCA_rmaps_base_oversubscribe=${OMPI_MCA_rmaps_base_oversubscribe:-1}
read -r -a MPIRUN <<< "${MPIRUN:-mpirun}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
STEPS=8

train() { # train RUN_DIR_NAME LAUNCHER... -- ARGS...
  local run=$1
  shift
  local launcher=()
  while [ "$1" != "--" ]; do launcher+=("$1"); shift; done
  shift
  (cd "$WORK" && "${launcher[@]}" "$BIN" train --config "$ROOT/configs/tiny.toml" \
    --steps "$STEPS" --run-dir "$run" --peak-flops 1e11 --sample-tokens 0 "$@" \
    > "$run.log" 2>&1) || {
    echo "FAILED: $run (${launcher[*]} megamoe train … $*):" >&2
    tail -20 "$WORK/$run.log" >&2
    exit 1
  }
}

losses() { # "step total" per step record of a run
  grep '"kind":"step"' "$WORK/$1/metrics.jsonl" |
    sed -E 's/.*"step":([0-9]+),"loss":\{"total":([^,}]+).*/\1 \2/'
}

worst=0
status=0
for layout in "${LAYOUTS[@]}"; do
  case "$layout" in
    dp2) n=2; micro=2; sets=(--set parallel.dp=2) ;;
    ep2) n=2; micro=2; sets=(--set parallel.ep=2) ;;
    dp2xep2) n=4; micro=4; sets=(--set parallel.dp=2 --set parallel.ep=2) ;;
    tp2) n=2; micro=1; sets=(--set parallel.tp=2) ;;
    dp2-fsdp2) n=2; micro=2; sets=(--set parallel.dp=2 --set parallel.fsdp=2) ;;
    dp2-fsdp3) n=2; micro=2; sets=(--set parallel.dp=2 --set parallel.fsdp=3) ;;
    dp2xtp2-fsdp3) n=4; micro=2; sets=(--set parallel.dp=2 --set parallel.tp=2 --set parallel.fsdp=3) ;;
    dp2xtp2-sp) n=4; micro=2; sets=(--set parallel.dp=2 --set parallel.tp=2 --set parallel.sp=true) ;;
    dp2xpp2-fsdp2) n=4; micro=4; sets=(--set parallel.dp=2 --set parallel.pp=2 --set parallel.fsdp=2 --set parallel.microbatches=2) ;;
    dp2xpp2-fsdp3) n=4; micro=4; sets=(--set parallel.dp=2 --set parallel.pp=2 --set parallel.fsdp=3 --set parallel.microbatches=2 --set 'parallel.schedule="zb-h1"') ;;
    pp2xtp2) n=4; micro=4; sets=(--set parallel.pp=2 --set parallel.tp=2 --set parallel.microbatches=4 --set 'parallel.schedule="dualpipev"') ;;
    pp2-*)
      n=2; micro=4
      sets=(--set parallel.pp=2 --set parallel.microbatches=4 --set "parallel.schedule=\"${layout#pp2-}\"")
      [ "$layout" = pp2-interleaved ] && sets+=(--set parallel.vpp=2)
      ;;
    dp2xep2xpp2) n=8; micro=8; sets=(--set parallel.dp=2 --set parallel.ep=2 --set parallel.pp=2 --set parallel.microbatches=2) ;;
    *) echo "unknown layout $layout (see the list at the top)" >&2; exit 2 ;;
  esac
  ref="one-m$micro"
  [ -d "$WORK/$ref" ] || train "$ref" -- --set "parallel.microbatches=$micro"
  t0=$(date +%s.%N)
  train "$layout" "${MPIRUN[@]}" -n "$n" -- "${sets[@]}"
  t1=$(date +%s.%N)
  grep -q "$n MPI processes" "$WORK/$layout.log" || {
    echo "FAILED: $layout: the run did not say it ran $n MPI processes" >&2
    exit 1
  }
  train "$layout-threads" -- --world "$n" "${sets[@]}"
  same=identical
  if [ "$(losses "$layout")" != "$(losses "$layout-threads")" ]; then
    same=DIFFERENT
    status=1
  fi
  diff=$(paste <(losses "$ref") <(losses "$layout") | awk -v steps="$STEPS" '
    { n++; if ($1 != $3) bad = 1; d = $4 - $2; if (d < 0) d = -d; r = d / ($2 < 0 ? -$2 : $2);
      if (r > m) m = r }
    END { if (n != steps || bad) print "bad"; else printf "%.3e", m }')
  if [ "$diff" = bad ]; then
    echo "FAILED: $layout: the runs do not have the same $STEPS step records" >&2
    exit 1
  fi
  verdict=ok
  if awk -v d="$diff" 'BEGIN { exit !(d > 1e-5) }'; then verdict=FAILED; status=1; fi
  worst=$(awk -v a="$worst" -v b="$diff" 'BEGIN { print (b > a ? b : a) }')
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  printf '%-16s mpirun -n %d vs 1 process (parallel.microbatches=%d): %d steps, max rel diff %s, %s s  %s; vs --world %d thread ranks: %s\n' \
    "$layout" "$n" "$micro" "$STEPS" "$diff" "$secs" "$verdict" "$n" "$same"
done
echo "mpi_layouts: ${#LAYOUTS[@]} layouts, max rel diff $worst (bar 1e-5)"
exit $status

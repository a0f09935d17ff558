#!/usr/bin/env bash
# A killed rank stops the job: starts `mpirun -n 2 BIN train … --set parallel.dp=2`, waits
# until step 3 is logged, kills rank 1 with SIGKILL and times how long the job takes to
# end. Passes when every other process has exited non-zero within 60 s and the output
# names rank 1. Two modes (both by default):
#   launcher  OpenMPI as installed: mpirun sees the dead process and stops the job;
#   megamoe   mpirun told to keep the job running (orte_enable_recovery): rank 0 must stop
#             on its own, its communicator timing out on rank 1 (MEGAMOE_COMM_TIMEOUT=10).
# and a third without a kill:
#   fault     rank 1 fails by itself (MEGAMOE_RANK_FAULT=1@3): it tells rank 0, which must
#             stop with an error naming rank 1.
#
#   tools/mpi_kill.sh target/release/megamoe [launcher|megamoe|fault]
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 BIN [launcher|megamoe|fault]" >&2
  exit 2
fi
BIN=$(realpath "$1")
shift
MODES=("$@")
[ ${#MODES[@]} -gt 0 ] || MODES=(fault launcher megamoe)
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export OMPI_MCA_rmaps_base_oversubscribe=${OMPI_MCA_rmaps_base_oversubscribe:-1}
WORK=$(mktemp -d)
MPIRUN_PID=
cleanup() {
  [ -n "$MPIRUN_PID" ] && kill -9 "$MPIRUN_PID" 2> /dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
LIMIT=60

now() { date +%s.%N; }
# True while process $1 runs (a zombie, i.e. exited but not yet reaped, counts as ended).
alive() {
  local st
  st=$(cat "/proc/$1/stat" 2> /dev/null) || return 1
  st=${st##*) }
  [[ $st != Z* && $st != X* ]]
}
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# The children of process $1 (from /proc: no procps needed).
children() { cat /proc/"$1"/task/*/children 2> /dev/null || true; }

# The pid of the process of MPI rank $2 among the children of mpirun $1.
rank_pid() {
  local p
  for p in $(children "$1"); do
    if tr '\0' '\n' < "/proc/$p/environ" 2> /dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$2"; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

status=0
for mode in "${MODES[@]}"; do
  if [ "$mode" = fault ]; then
    start=$(now)
    rc=0
    MEGAMOE_RANK_FAULT=1@3 timeout "$LIMIT" mpirun -n 2 "$BIN" train \
      --config "$ROOT/configs/tiny.toml" --set parallel.dp=2 --steps 300 \
      --run-dir "$WORK/fault" --peak-flops 1e11 > "$WORK/fault.log" 2>&1 || rc=$?
    named=$(grep -m1 "error: rank 0 of 2: .*rank 1 failed" "$WORK/fault.log" || true)
    if [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || [ -z "$named" ]; then
      echo "FAILED (fault): exit $rc; rank 0 naming rank 1: ${named:-none}" >&2
      tail -20 "$WORK/fault.log" >&2
      status=1
    else
      echo "fault: rank 1 failed at step 3; job ended in $(elapsed "$start") s, exit $rc: $named"
    fi
    continue
  fi
  extra=()
  case "$mode" in
    launcher) ;;
    megamoe) extra=(--mca orte_enable_recovery 1) ;;
    *) echo "unknown mode $mode (launcher|megamoe|fault)" >&2; exit 2 ;;
  esac
  log="$WORK/$mode.log"
  run="$WORK/$mode"
  # Each rank's own exit status lands in $WORK/$mode.rc.<rank> (mpirun's status is the
  # launcher's view, which under recovery does not report the ranks' errors).
  # Launcher mode starts the ranks directly (a wrapper would exit 0 and hide the kill).
  wrap=()
  if [ "$mode" = megamoe ]; then
    wrap=(sh -c '"$0" "$@"; echo $? > "'"$WORK/$mode"'.rc.$OMPI_COMM_WORLD_RANK"')
  fi
  MEGAMOE_COMM_TIMEOUT=10 mpirun "${extra[@]}" -n 2 "${wrap[@]}" "$BIN" train --config "$ROOT/configs/tiny.toml" \
    --set parallel.dp=2 --steps 300 --run-dir "$run" --peak-flops 1e11 > "$log" 2>&1 &
  MPIRUN_PID=$!
  start=$(now)
  until grep -q '"step":3,' "$run/metrics.jsonl" 2> /dev/null; do
    if ! alive "$MPIRUN_PID"; then
      echo "FAILED ($mode): the job ended before step 3:" >&2
      tail -20 "$log" >&2
      exit 1
    fi
    if [ "$(elapsed "$start" | cut -d. -f1)" -ge 300 ]; then
      echo "FAILED ($mode): no step 3 within 300 s" >&2
      exit 1
    fi
    sleep 0.2
  done
  rank0=$(rank_pid "$MPIRUN_PID" 0)
  rank1=$(rank_pid "$MPIRUN_PID" 1)
  if [ "$mode" = megamoe ]; then # the train processes are the wrappers' children
    read -r rank0 _ < <(children "$rank0") || true
    read -r rank1 _ < <(children "$rank1") || true
  fi
  killed=$(now)
  kill -9 "$rank1"
  # Wait for mpirun (and with it every rank) to end, at most LIMIT seconds.
  while alive "$MPIRUN_PID" && [ "$(elapsed "$killed" | cut -d. -f1)" -lt "$LIMIT" ]; do
    sleep 0.1
  done
  took=$(elapsed "$killed")
  if alive "$MPIRUN_PID" || alive "$rank0"; then
    echo "FAILED ($mode): the job was still running $LIMIT s after rank 1 was killed" >&2
    tail -20 "$log" >&2
    status=1
    continue
  fi
  rc=0
  wait "$MPIRUN_PID" || rc=$?
  mpirun_rc=$rc
  MPIRUN_PID=
  named=$(grep -m1 -E "rank 1|rank\(s\) \[1\]" "$log" || true)
  rank0_rc="killed by mpirun"
  if [ "$mode" = megamoe ]; then
    rank0_rc=$(cat "$WORK/$mode.rc.0" 2> /dev/null || echo "none")
    rc=$rank0_rc
  fi
  if [ "$rc" = 0 ] || [ -z "$named" ]; then
    echo "FAILED ($mode): exit $rc; a line naming rank 1: ${named:-none}" >&2
    tail -20 "$log" >&2
    status=1
    continue
  fi
  if [ "$mode" = megamoe ] && ! grep -q "error: rank 0 of 2:.*rank(s) \[1\]" "$log"; then
    echo "FAILED ($mode): rank 0 did not stop with its own error naming rank 1:" >&2
    tail -20 "$log" >&2
    status=1
    continue
  fi
  echo "$mode: rank 1 (pid $rank1) killed at step >= 3; job ended in $took s (limit $LIMIT), rank 0 exit ${rank0_rc}, mpirun exit $mpirun_rc: $(echo "$named" | sed -E 's/^ +//' | cut -c1-160)"
done
exit $status

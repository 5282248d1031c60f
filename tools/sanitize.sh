#!/usr/bin/env bash
# Run compute-sanitizer (memcheck, racecheck, synccheck) over
# tools/sanitize_cases.py. Needs a GPU and compute-sanitizer on PATH.
# Usage: bash tools/sanitize.sh [LOGDIR]
set -u
logdir=${1:-sanitize-logs}
mkdir -p "$logdir"
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
# Compile first, outside the sanitizer (NVRTC under the sanitizer is slow).
python3 tools/sanitize_cases.py > "$logdir/plain.txt" 2>&1 || { cat "$logdir/plain.txt"; exit 1; }
status=0
for tool in memcheck racecheck synccheck; do
  extra=""
  [ "$tool" = memcheck ] && extra="--leak-check no"
  "$cs" --tool "$tool" $extra --error-exitcode 9 python3 tools/sanitize_cases.py > "$logdir/$tool.txt" 2>&1
  rc=$?
  summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$logdir/$tool.txt" | tail -1)
  echo "$tool: rc=$rc ${summary:-no summary line}"
  [ $rc -ne 0 ] && status=1
done
exit $status

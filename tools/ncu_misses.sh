#!/usr/bin/env bash
# Nsight Compute on family shapes that miss the floor: SEED, FAMILY_N, CASES ("f12 f15 ..."), OUT.
# One line block per case: duration, DRAM and memory throughput, grid, occupancy, warp cycles per issue.
set -u
export PYTHONPATH=.:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 tools/precompile.py --dtypes f16 > /dev/null 2>&1
for c in ${CASES}; do
  ncu --kernel-name regex:lean_.*attention --launch-skip 3 --launch-count 1 --section SpeedOfLight --section LaunchStats \
      --section WarpStateStats --section Occupancy \
      python3 tools/ncu_family.py --seed "$SEED" --family "$FAMILY_N" --case "$c" > "$OUT/ncu_$c.txt" 2>&1
  grep -E "^f[0-9]|  grid|Duration|DRAM Throughput|Memory Throughput|Grid Size|Warp Cycles Per Issued|Achieved Occupancy" \
      "$OUT/ncu_$c.txt" | head -12
done

#!/usr/bin/env bash
# Nsight Compute over many family calls in one process (tools/ncu_family.py's batch mode), then the table.
# Env: SEED, FAMILY_N, CASES (default all), DTYPES (default float16), FP8 (1: e4m3 K/V), BENCH (a family
# run's bench_*.json to join), AGAINST (another run's ncu_table_*.json: this run's time over it), TAG (file names; default s$SEED, s${SEED}_e4m3 with FP8=1), OUT.
set -u -o pipefail
export PYTHONPATH=.:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
FP8_ARG=""; [ "${FP8:-0}" = 1 ] && FP8_ARG=--fp8
TAG=${TAG:-s${SEED}${FP8_ARG:+_e4m3}}
M=$(python3 -c "import sys; sys.path.insert(0, 'tools'); import ncu_table; print(','.join(ncu_table.METRICS))")
run_ncu() {
  rm -f "$OUT/ncu_$TAG.ncu-rep" "$OUT/ncu_index_$TAG.json"  # no stale report or index passes for this run's
  ncu --profile-from-start off --clock-control none --metrics "$1" --export "$OUT/ncu_$TAG" --force-overwrite \
    python3 tools/ncu_family.py --seed "$SEED" --family "$FAMILY_N" --case "${CASES:-all}" \
      --dtypes "${DTYPES:-float16}" $FP8_ARG --index-out "$OUT/ncu_index_$TAG.json" > "$OUT/ncu_log_$TAG.txt" 2>&1
}
run_ncu "$M"
if ! [ -s "$OUT/ncu_$TAG.ncu-rep" ]; then
  # a metric this ncu lacks fails the whole run: fall back to the ones without stall reasons
  echo "ncu failed with the stall metrics; again without them"; tail -3 "$OUT/ncu_log_$TAG.txt"
  run_ncu "$(python3 -c "import sys; sys.path.insert(0, 'tools'); import ncu_table; print(','.join(ncu_table.CORE))")"
fi
ncu --import "$OUT/ncu_$TAG.ncu-rep" --csv --page raw --print-units base > "$OUT/ncu_raw_$TAG.csv" 2> "$OUT/ncu_import_$TAG.txt"
python3 tools/ncu_table.py --raw "$OUT/ncu_raw_$TAG.csv" --index "$OUT/ncu_index_$TAG.json" \
  ${BENCH:+--bench "$BENCH"} ${AGAINST:+--against "$AGAINST"} --out "$OUT/ncu_table_$TAG.json" | tee "$OUT/ncu_table_$TAG.md"

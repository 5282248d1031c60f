#!/usr/bin/env bash
# One build-test-measure cycle on a lent GPU machine, results under $OUT.
# Usage: bash tools/device_cycle.sh STEPS...   (steps: precompile smoke tests tests-par sanitize fp8 fp8-marginal pair-heads host-time family-quick family tune trees split-gap saturation)
#   precompile   every spec (and tile override) into CuPy's disk cache, in parallel
#   tune         python -m bench.tune measure on FAMILY_N shapes of seed SEED -> $OUT/tune_SEED.json
#   tests        the GPU test suite                    -> $OUT/gpu_tests.txt
#   tests-par    the same in SHARDS parallel processes (default 6) -> $OUT/gpu_tests.txt
#   sanitize     tools/sanitize.sh                     -> $OUT/sanitize.txt
#   smoke        tools/smoke.py under SMOKE_TIMEOUT (default 240 s): the likeliest-broken paths in a minute,
#                before the suite -> $OUT/smoke.txt
#   fp8          tools/fp8_timing.py on FAMILY_N shapes of seed SEED, q in each of DTYPES, this tree and
#                each tree in TREES -> $OUT/fp8_TREE_DTYPE_SEED.json
#   fp8-marginal tools/fp8_timing.py --matched-bytes (the marginal time per token) on FAMILY_N shapes of seed
#                SEED, q in each of DTYPES, extra options in FP8_FLAGS (e.g. --flashinfer, --only 3,7)
#                -> $OUT/fp8_marginal_DTYPE_SEED.{json,txt}
#   pair-heads   tools/pair_heads_probe.py on FAMILY_N shapes of seed SEED (head_dim 64, even KV head counts),
#                q in each of DTYPES, extra options in PAIR_FLAGS (e.g. --only 11,14,17)
#                -> $OUT/pair_heads_DTYPE_SEED.{json,txt}
#   host-time    python -m bench.host_time: this tree, then .base/ (if there) and this tree again
#                -> $OUT/host_TAG.txt, $OUT/host_time_TAG_N.json
#   family-quick lean only, this tree and .base/ (a copy of the package before
#                the change, with this tree's bench/), FAMILY_N shapes, seed SEED
#   family       the same with every peer on this tree (FlashInfer from .whl/ if carried)
# trees: lean only with each package tree in TREES (older commits), the same shapes
# saturation: the equal-length model's saturating fraction: tools/cta_rate.py (CTA_GROUPS, default 1,8)
#   -> $OUT/cta_rate.json, then spec_sweep on 1-2 GB dense calls whose split fills 70-90% of the SMs
#   (seeds SAT_SEEDS, default SEED; default, stream-K, split_sms, sat08, sat09) -> $OUT/sat_S.json, and
#   session 20's short calls (seed 20124321) with default, sk, split_sms, sat08 -> $OUT/sat_20124321.json
# split-gap: tools/split_gap.py (launch-time split against host split, timeline stamps) on SEED's
#   FAMILY_N shapes of at most 44 units and 80 MB, with this tree and each tree in TREES
# Env: TESTS_TIMEOUT (tests-par, default 1200 s), METHODS (family step, default lean and every peer), TUNE_GROUPS ("LOW HIGH" for tune), TREES, SEED (default 1), FAMILY_N (default 24), DTYPES (default fp16), BUDGET (seconds after
# which the benchmark starts no new shape; default 0: none).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-}
SEED=${SEED:-1}; N=${FAMILY_N:-24}; DT=${DTYPES:-fp16}
DT_SPEC=$(echo "$DT" | sed 's/fp16/f16/g')
# another package tree (TREES, .base) runs with this tree's bench/ and tools/
this_tools() {
  if [ "$1" != . ]; then rm -rf "$1/bench" "$1/tools" && cp -r bench "$1/bench" && cp -r tools "$1/tools"; fi
}
nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem --format=csv,noheader > "$OUT/gpu.txt" 2>&1
for step in "$@"; do
  t0=$(date +%s)
  case $step in
    precompile)
      python3 tools/precompile.py --all-tiles;;
    tune)
      python3 -m bench.tune measure --family "$N" --seed "$SEED" --out "$OUT/tune_$SEED${TUNE_GROUPS:+_g${TUNE_GROUPS// /-}}.json" \
        --time-budget "${BUDGET:-0}" --groups ${TUNE_GROUPS:-1 16} > "$OUT/tune_$SEED.txt" 2>&1; tail -3 "$OUT/tune_$SEED.txt";;
    trees)
      # lean only, the same family shapes, with each package tree in TREES (dirs holding cupy_lean/ and
      # kernels_cu/, e.g. older commits) and this tree's bench/
      for t in ${TREES:-}; do
        this_tools "$t"
        (cd "$t" && python3 tools/precompile.py --dtypes $DT_SPEC > /dev/null 2>&1 || true)
        tag=$(basename "$t")
        (cd "$t" && PYTHONPATH=.:/tmp/site python3 -m bench.run --family "$N" --seed "$SEED" --dtypes "$DT" \
           --methods lean --out "$OUT" --tag "tree$tag" --no-plots --time-budget 0 > "$OUT/tree$tag.txt" 2>&1)
        echo "$tag: $(grep '^family seed' "$OUT/tree$tag.txt" | head -1)"
      done;;
    split-gap)
      for t in . ${TREES:-}; do
        tag=$(basename "$(cd "$t" && pwd)")
        this_tools "$t"
        (cd "$t" && PYTHONPATH=.:/tmp/site python3 tools/split_gap.py --seed "$SEED" --shapes "$N" --max-mb 80 \
           --min-units 2 --max-units 44 --out "$OUT/split_gap_${tag}_$SEED.json" > "$OUT/split_gap_${tag}.txt" 2>&1)
        echo "== $tag"; grep -E "us/call" "$OUT/split_gap_${tag}.txt" | sed 's/  attn span.*found med\/max/ found/; s/  tile0.*//'
      done;;
    saturation)
      python3 tools/cta_rate.py --groups "${CTA_GROUPS:-1,8}" --out "$OUT/cta_rate.json" > "$OUT/cta_rate.txt" 2>&1
      echo "cta_rate: $(wc -l < "$OUT/cta_rate.txt") lines"
      for S in ${SAT_SEEDS:-$SEED}; do
        python3 tools/spec_sweep.py --shapes 10 --seed "$S" --lengths 20000,160000 --units 0.3,0.8 --max-mb 2000 \
          --sm-fraction 0.7,0.9 --configs default,sk,split_sms,sat08,sat09 --out "$OUT/sat_$S.json" > "$OUT/sat_$S.txt" 2>&1
        echo "sat seed $S: $(grep -c ' MB ' "$OUT/sat_$S.txt") shapes"
      done
      python3 tools/spec_sweep.py --shapes 18 --seed 20124321 --lengths 2000,40000 --units 0.15,1.0 \
        --configs default,sk,split_sms,sat08 --out "$OUT/sat_20124321.json" > "$OUT/sat_20124321.txt" 2>&1
      echo "sat seed 20124321: $(grep -c ' MB ' "$OUT/sat_20124321.txt") shapes"
      python3 tools/saturation_fit.py --rates "$OUT/cta_rate.json" --sweeps "$OUT"/sat_*.json 2>&1 | tee "$OUT/saturation_fit.txt";;
    tests)
      python3 -m pytest tests -q -m gpu -p no:cacheprovider --maxfail=8 > "$OUT/gpu_tests.txt" 2>&1
      echo "tests: $(grep -E 'passed|failed|error' "$OUT/gpu_tests.txt" | tail -1)";;
    tests-par)
      # the GPU tests in SHARDS processes at once (they are mostly compile- and
      # NumPy-bound), round-robin over the collected ids; one summary file
      # TESTS_TIMEOUT (s): stop the shards there; gpu_shards.py still writes what finished
      timeout "${TESTS_TIMEOUT:-1200}" python3 tools/gpu_shards.py --shards "${SHARDS:-6}" --out "$OUT/gpu_tests.txt" \
        --save-durations "$OUT/gpu_durations.json" ${TESTS_K:+-k "$TESTS_K"}
      tail -${SHARDS:-6} "$OUT/gpu_tests.txt";;
    sanitize)
      bash tools/sanitize.sh /tmp/sanlogs > "$OUT/sanitize.txt" 2>&1; cat "$OUT/sanitize.txt";;
    smoke)
      timeout "${SMOKE_TIMEOUT:-240}" python3 tools/smoke.py > "$OUT/smoke.txt" 2>&1; echo "smoke rc $?"
      grep -E "^FAIL|^smoke" "$OUT/smoke.txt";;
    fp8)
      # this tree and each tree in TREES, q in each of DTYPES
      for t in . ${TREES:-}; do
        tag=$(basename "$(cd "$t" && pwd)")
        this_tools "$t"
        # the e4m3 specs (and the plain ones) of this tree, compiled in parallel first
        (cd "$t" && PYTHONPATH=.:/tmp/site python3 tools/precompile.py --features 0,16 --dtypes "$DT_SPEC" \
           > /dev/null 2>&1 || true)
        for dt in $(echo "$DT" | tr ',' ' '); do
          name=$([ "$dt" = bf16 ] && echo bfloat16 || echo float16)
          (cd "$t" && PYTHONPATH=.:/tmp/site python3 tools/fp8_timing.py --family "$N" --seed "$SEED" --dtype "$name" \
             --out "$OUT/fp8_${tag}_${dt}_$SEED.json" > "$OUT/fp8_${tag}_${dt}_$SEED.txt" 2>&1)
          echo "$tag: $(tail -1 "$OUT/fp8_${tag}_${dt}_$SEED.txt")"
        done
      done;;
    fp8-marginal)
      for dt in $(echo "$DT" | tr ',' ' '); do
        name=$([ "$dt" = bf16 ] && echo bfloat16 || echo float16)
        python3 tools/precompile.py --features 0,16 --dtypes "$(echo "$dt" | sed 's/fp16/f16/')" > /dev/null 2>&1 || true
        python3 tools/fp8_timing.py --family "$N" --seed "$SEED" --dtype "$name" --matched-bytes ${FP8_FLAGS:-} \
          --out "$OUT/fp8_marginal_${dt}_$SEED.json" > "$OUT/fp8_marginal_${dt}_$SEED.txt" 2>&1
        grep "^fp8 seed" "$OUT/fp8_marginal_${dt}_$SEED.txt"
      done;;
    pair-heads)
      for dt in $(echo "$DT" | tr ',' ' '); do
        name=$([ "$dt" = bf16 ] && echo bfloat16 || echo float16)
        python3 tools/pair_heads_probe.py --family "$N" --seed "$SEED" --dtype "$name" ${PAIR_FLAGS:-} \
          --out "$OUT/pair_heads_${dt}_$SEED.json" > "$OUT/pair_heads_${dt}_$SEED.txt" 2>&1
        tail -${PAIR_TAIL:-12} "$OUT/pair_heads_${dt}_$SEED.txt"
      done;;
    host-time)
      order=new; [ -d .base ] && order="new base new"
      n=0
      for tag in $order; do
        n=$((n + 1)); d=.; [ "$tag" = base ] && { this_tools .base; d=.base; }
        (cd "$d" && PYTHONPATH=.:/tmp/site python3 -m bench.host_time --label "$tag" \
           --out "$OUT/host_time_${tag}_$n.json") > "$OUT/host_${tag}_$n.txt" 2>&1
        grep -E "out=|torch" "$OUT/host_${tag}_$n.txt"
      done;;
    family-quick|family)
      methods=lean; [ "$step" = family ] && methods=${METHODS:-lean,sdpa-cudnn,sdpa-flash,flashinfer,flashinfer-tc}
      if [ -d .base ]; then
        this_tools .base
        (cd .base && PYTHONPATH=.:/tmp/site python3 -m bench.run --family "$N" --seed "$SEED" --dtypes "$DT" \
           --methods lean --out "$OUT" --tag "base_$step" --no-plots --time-budget 0 > "$OUT/base_$step.txt" 2>&1)
        echo "base: $(grep '^family seed' "$OUT/base_$step.txt" | head -1)"
      fi
      python3 -m bench.run --family "$N" --seed "$SEED" --dtypes "$DT" --methods "$methods" --out "$OUT" \
        --tag "new_$step" --no-plots --time-budget "${BUDGET:-0}" > "$OUT/new_$step.txt" 2>&1
      grep -E '^(family seed|stopped early)' "$OUT/new_$step.txt"  # a cut run names what it skipped
      if [ -d .base ] && [ "$step" = family ]; then
        python3 -m bench.report "$OUT/bench_base_$step.json" --peers-from "$OUT/bench_new_$step.json" \
          > "$OUT/base_vs_peers.txt" 2>&1
        echo "base with these peers:"; grep '^family seed' "$OUT/base_vs_peers.txt"
      fi;;
  esac
  echo "[$step: $(( $(date +%s) - t0 )) s]"
done

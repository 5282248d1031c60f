#!/usr/bin/env bash
# Nsight Compute on chosen family shapes: SEED, FAMILY_N, CASES ("f12 f15 ..."), OUT; optional DTYPES, BENCH.
# The chosen calls of tools/ncu_family.sh (one ncu process, the table of what bounds each call);
# this name is kept for the commands in the docs of earlier runs.
set -u
export CASES=$(echo "${CASES}" | tr -s ' ' ',' | sed 's/^,//; s/,$//')
exec bash "$(dirname "$0")/ncu_family.sh"

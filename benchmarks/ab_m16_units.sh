#!/usr/bin/env bash
# NOTES_dense.md v24's two ring changes against the knobs that undo them: the unsliced m_tile-2
# block's 8-chunk units (JAX_NVFP4_CHUNKS_PER_STAGE_MT2=4: the old 4) and the 4-slice block's
# 8-row tile at 3 stages (JAX_NVFP4_PAIR_ROW8_STAGES=2: the old 2). One device call, output
# under $OUT:  bash benchmarks/ab_m16_units.sh
# kernel_lab, two interleaved rounds, the first checked against the plain launch.
set -uo pipefail
source benchmarks/lab_ab.sh
build_labs "main" \
  "old -DJAX_NVFP4_CHUNKS_PER_STAGE_MT2=4 -DJAX_NVFP4_PAIR_ROW8_STAGES=2" || exit 1
launches() {
  local check=$1 lab shape m
  for lab in main old; do
    echo "-- $lab"
    for shape in "4096 14336" "8192 28672" "4096 57344"; do
      for m in 16 12; do LAB_CHECK=$check /tmp/lab_$lab $shape $m; done
    done
    for shape in "4096 14336" "14336 4096" "8192 28672" "4096 4096" "4096 57344"; do
      for m in 8 5; do LAB_CHECK=$check /tmp/lab_$lab $shape $m 1 4 0; done
    done
  done
}
two_rounds lab_m16_units launches

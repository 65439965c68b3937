#!/usr/bin/env bash
# M = 16 (m_tile 2): the unsliced block's ring, deeper (JAX_NVFP4_DECODE_STAGES 3, 4) or with
# longer units (JAX_NVFP4_CHUNKS_PER_STAGE 8: half the barriers per weight byte), against the
# extension's 2 stages of 4 chunks; the k-sliced m_tile-2 launch and the 8-row m_tile-1 tile
# (which take DECODE_STAGES too) alongside. One device call, output under $OUT:
#   bash benchmarks/ab_m16_ring.sh
# kernel_lab, two interleaved rounds, the first checked against the plain launch.
set -uo pipefail
source benchmarks/lab_ab.sh
build_labs "main" "st3 -DJAX_NVFP4_DECODE_STAGES=3" "st4 -DJAX_NVFP4_DECODE_STAGES=4" \
  "c8 -DJAX_NVFP4_CHUNKS_PER_STAGE=8" || exit 1
launches() {
  local check=$1 lab
  for lab in main st3 st4 c8; do
    echo "-- $lab"
    LAB_CHECK=$check /tmp/lab_$lab 4096 14336 16
    LAB_CHECK=$check /tmp/lab_$lab 8192 28672 16
    LAB_CHECK=$check /tmp/lab_$lab 4096 57344 16
    LAB_CHECK=$check /tmp/lab_$lab 14336 4096 16 1 8 0
    LAB_CHECK=$check /tmp/lab_$lab 4096 14336 8 1 4 0
  done
}
two_rounds lab_m16_ring launches

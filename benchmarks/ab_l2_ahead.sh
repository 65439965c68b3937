#!/usr/bin/env bash
# NOTES_dense.md v27: does an L2 prefetch of the weight stream, JAX_NVFP4_L2_AHEAD units past
# the cp.async ring, shorten the launches whose stages hold few weight bytes (the k-sliced
# m_tile-2 block at M = 9-16: 8 KB a stage, one stage in flight per block; the 4-slice 8-row
# tile at M = 5-8: 16 KB)? kernel_lab main / ahead 1, 2, 4, 8 on the launches the extension
# picks on an H200 at M = 16, 8 and 1, two interleaved rounds, every launch of round 1 checked
# against the plain launch and its output hash against main's (a prefetch changes no bit).
# One device call each, output under $OUT:
#   bash benchmarks/ab_l2_ahead.sh        kernel_lab (~4 min)
#   bash benchmarks/ab_l2_ahead.sh moe    the MoE layers (profile_moe, GPU us per layer, T = 1
#     and 16) through the extension built with D = ${MOE_AHEAD:-2}, with D and
#     JAX_NVFP4_L2_SUCCESSOR=1 (the prefetch runs on into the first units of the block launched
#     `resident` blocks later: the decode GEMMs' later waves), and as shipped (~7 min)
set -uo pipefail
source benchmarks/lab_ab.sh
if [ "${1:-}" = moe ]; then
  ahead="-DJAX_NVFP4_L2_AHEAD=${MOE_AHEAD:-2}"
  for build in ahead successor plain; do
    case $build in
      ahead) defines=$ahead ;;
      successor) defines="$ahead -DJAX_NVFP4_L2_SUCCESSOR=1" ;;
      plain) defines="" ;;
    esac
    build_extension "build_$build.log" "$defines" || exit 1
    profile_layers "$build" 1,16
  done
  exit 0
fi
build_labs "main" "ahead1 -DJAX_NVFP4_L2_AHEAD=1" "ahead2 -DJAX_NVFP4_L2_AHEAD=2" \
  "ahead4 -DJAX_NVFP4_L2_AHEAD=4" "ahead8 -DJAX_NVFP4_L2_AHEAD=8" || exit 1
launches() {
  local check=$1 lab args
  for lab in main ahead1 ahead2 ahead4 ahead8; do
    echo "-- $lab"
    # M = 16: 8 k-slices at m_tile 2 (14336x4096, 4096x4096), 2-split cluster, unsplit.
    for args in "14336 4096 16 1 8 0" "4096 4096 16 1 8 0" "4096 14336 16" "8192 28672 16"; do
      LAB_CHECK=$check /tmp/lab_$lab $args
    done
    # M = 8: the 4-slice 8-row tile (3 stages of 16 KB of weights), 8 slices at 8192x28672.
    # M = 1: the 4-slice 1-row tile (32 KB of weights a stage), long 8-slice slices.
    for args in "4096 14336 8 1 4 0" "14336 4096 8 1 4 0" "8192 28672 8 1 8 0" \
                "4096 14336 1 1 4 0" "14336 4096 1 1 4 0" "8192 28672 1 1 8 0" \
                "4096 4096 1 1 4 0"; do
      LAB_CHECK=$check /tmp/lab_$lab $args
    done
  done
}
two_rounds ab_l2_ahead launches
same_bits_as_main ab_l2_ahead

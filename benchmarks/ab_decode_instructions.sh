#!/usr/bin/env bash
# NOTES_dense.md v26: three lab knobs that take instructions out of the decode loop without
# changing a stored bit, against main, on the dense launches the extension picks on an H200 at
# M = 1, 2, 8 and 16 (kernel_lab, two interleaved rounds, the first checked against the plain
# launch). JAX_NVFP4_WIDEN_PRMT: scale widening by PRMT + LEA; JAX_NVFP4_LEAN_ADDRESSING: one
# ldmatrix address per k16 pair (short tiles' missing rows read row 0, no zero row), chunk bounds
# against k64 - chunk, stage loads from the pinned shared base; JAX_NVFP4_X_ROW_GROUPS: the
# m_tile-2 x copies by row groups (one address per 8 rows, immediates). "lean" has all three.
# One device call, output under $OUT:  [MEMCHECK=1] [MOE=1] bash benchmarks/ab_decode_instructions.sh
set -uo pipefail
source benchmarks/lab_ab.sh
lean="-DJAX_NVFP4_WIDEN_PRMT=1 -DJAX_NVFP4_LEAN_ADDRESSING=1 -DJAX_NVFP4_X_ROW_GROUPS=1"
build_labs "main" "widen -DJAX_NVFP4_WIDEN_PRMT=1" "address -DJAX_NVFP4_LEAN_ADDRESSING=1" \
  "rows -DJAX_NVFP4_X_ROW_GROUPS=1" "lean $lean" || exit 1
launches() {
  local check=$1 lab args
  for lab in main lean widen address rows; do
    echo "-- $lab"
    # M = 1, 2 and 8: the k-sliced launches (4 slices, or 8 with long slices at 8192x28672).
    for args in "4096 14336 1 1 4 0" "14336 4096 1 1 4 0" "8192 28672 1 1 8 0" \
                "4096 4096 1 1 4 0" "4096 14336 2 1 4 0" "8192 28672 2 1 8 0" \
                "4096 14336 8 1 4 0" "8192 28672 8 1 8 0"; do
      LAB_CHECK=$check /tmp/lab_$lab $args
    done
    # M = 16: 2-split cluster, 8 k-slices at m_tile 2, unsplit.
    for args in "4096 14336 16" "14336 4096 16 1 8 0" "8192 28672 16"; do
      LAB_CHECK=$check /tmp/lab_$lab $args
    done
  done
}
two_rounds ab_decode_instructions launches
# No knob may change a stored bit: every launch's output hash (round 1) as main's.
same_bits_as_main ab_decode_instructions
# MEMCHECK=1: memcheck_dense and memcheck_moe built with the three knobs, under
# compute-sanitizer memcheck (every launch family on awkward shapes; ~2 minutes more).
if [ "${MEMCHECK:-0}" = 1 ]; then
  for what in dense moe; do
    nvcc -std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr -diag-suppress=940,2473,177 $lean \
      -I csrc "benchmarks/memcheck_$what.cu" -o "/tmp/memcheck_lean_$what" || exit 1
    compute-sanitizer --tool memcheck "/tmp/memcheck_lean_$what" > "$out/memcheck_lean_$what.txt" 2>&1
    echo "memcheck_$what (lean): exit $?; $(tail -2 "$out/memcheck_lean_$what.txt" | tr '\n' ' ')"
  done
fi
# MOE=1: the MoE layers too (profile_moe, GPU us per layer, T = 1 and 16): the extension built
# with the three knobs, then the shipped build, each profiled once (about 4 minutes more).
if [ "${MOE:-0}" = 1 ]; then
  for build in lean plain; do
    defines=$([ "$build" = lean ] && echo "$lean")
    build_extension "build_$build.log" "$defines" || exit 1
    profile_layers "$build" 1,16
  done
fi

#!/usr/bin/env bash
# NOTES_dense.md v26, v28: lab knobs that take instructions out of the decode loop without
# changing a stored bit, against main, on the dense launches the extension picks on an H200 at
# M = 1, 2, 8 and 16 (kernel_lab, two interleaved rounds, the first checked against the plain
# launch). Measured at 0caf86d with three knobs; two of them (one ldmatrix address per k16 pair
# with short tiles' missing rows reading row 0, and the m_tile-2 x copies by row groups) paid
# and are the default since v29; what is left is JAX_NVFP4_WIDEN_PRMT (scale widening by
# PRMT + LEA: 0 to +2 % then).
# One device call, output under $OUT:  [MEMCHECK=1] [MOE=1] bash benchmarks/ab_decode_instructions.sh
set -uo pipefail
source benchmarks/lab_ab.sh
widen="-DJAX_NVFP4_WIDEN_PRMT=1"
build_labs "main" "widen $widen" || exit 1
launches() {
  local check=$1 lab args
  for lab in main widen; do
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
# MEMCHECK=1: memcheck_dense and memcheck_moe built with the knob, under compute-sanitizer
# memcheck (every launch family on awkward shapes; ~2 minutes more).
if [ "${MEMCHECK:-0}" = 1 ]; then
  for what in dense moe; do
    nvcc -std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr -diag-suppress=940,2473,177 $widen \
      -I csrc "benchmarks/memcheck_$what.cu" -o "/tmp/memcheck_widen_$what" || exit 1
    compute-sanitizer --tool memcheck "/tmp/memcheck_widen_$what" > "$out/memcheck_widen_$what.txt" 2>&1
    echo "memcheck_$what (widen): exit $?; $(tail -2 "$out/memcheck_widen_$what.txt" | tr '\n' ' ')"
  done
fi
# MOE=1: the MoE layers too (profile_moe, GPU us per layer, T = 1 and 16): the extension built
# with the knob, then the shipped build, each profiled once (about 4 minutes more).
if [ "${MOE:-0}" = 1 ]; then
  for build in widen plain; do
    defines=$([ "$build" = widen ] && echo "$widen")
    build_extension "build_$build.log" "$defines" || exit 1
    profile_layers "$build" 1,16
  done
fi

#!/usr/bin/env bash
# One device call that settles NOTES_moe.md v22's opt-in long units (JAX_NVFP4_MOE_LONG_UNITS=1):
# their GPU test, the MoE GPU suites with the opt-in on for every launch, memcheck_moe (whose
# launches under test opt in, against 4-chunk plain launches) under compute-sanitizer, and the
# profile A/B in one build. Run on the GPU machine from the repo root (results under $OUT):
#   bash benchmarks/verify_long_units.sh
# If all pass and the profile shows the v22 gains, make moe_long_units (csrc/nvfp4_kernel.cuh)
# take long units unless the variable is "0", and turn test/memcheck/profile around.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
bash benchmarks/device_run.sh build || exit 1
python3 -m pytest -q -p no:cacheprovider tests/test_moe_gpu.py -k long_units 2>&1 | tail -3
JAX_NVFP4_MOE_LONG_UNITS=1 FILES="tests/test_moe_gpu.py tests/test_nnx.py tests/test_linen.py" \
  bash benchmarks/verify_device.sh 6 300
nvcc -std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr -diag-suppress=940,2473,177 -I csrc \
  benchmarks/memcheck_moe.cu -o /tmp/memcheck_moe || exit 1
compute-sanitizer --tool memcheck /tmp/memcheck_moe > "$out/memcheck_moe_long_units.txt" 2>&1
echo "[verify_long_units] memcheck_moe: exit $?; $(tail -2 "$out/memcheck_moe_long_units.txt" | tr '\n' ' ')"
(cd benchmarks && timeout 240 python3 profile_moe.py --tokens 1,2,16 --variants fused_moe,long_units \
   --out "$out/profile_moe_long_units.json" | grep span)

#!/usr/bin/env bash
# The grouped GEMMs' per-block timeline inside the MoE layer (moe_timeline.py says what it
# prints): builds the extension with -DJAX_NVFP4_LAB_TIMELINE=1 for sm_90a, runs the layers at
# T = 1 and 16, then rebuilds the plain extension. One device call, output under $OUT:
#   bash benchmarks/moe_timeline.sh
set -uo pipefail
source benchmarks/lab_ab.sh   # build_extension, $out
build_extension build_timeline.log "-DJAX_NVFP4_LAB_TIMELINE=1" || exit 1
(cd benchmarks && timeout 300 python3 moe_timeline.py --tokens "${TOKENS:-1,16}" \
   --clock-mhz "$(nvidia-smi --query-gpu=clocks.max.sm --format=csv,noheader,nounits | head -1)") \
  2>&1 | tee "$out/moe_timeline.txt"
build_extension build_plain.log || exit 1

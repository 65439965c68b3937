#!/usr/bin/env bash
# Is the decode routing kernel's time at one token its code (fetched from HBM after the
# previous layer's weight stream) or its dependent chain? route_lab.cu times it cold and warm
# for the benchmark layers' routing, built with moe_route_kernels.cuh's lab knobs: fast exp and
# division, the alignment loop rolled (unroll 4), one scoring path compiled (sigmoid / softmax
# only), and those together. Run on the GPU machine from the repo root (NOTES_moe.md v24):
#   bash benchmarks/ab_route_code.sh
set -uo pipefail
build() {  # NAME DEFINES...
  local name=$1; shift
  nvcc -std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr -diag-suppress=940,2473,177 -I csrc \
    "$@" benchmarks/route_lab.cu -o "/tmp/route_$name"
}
variants=("base" "fast -DJAX_NVFP4_ROUTE_FAST_MATH=1" "unroll4 -DJAX_NVFP4_ROUTE_ALIGN_UNROLL=4"
          "sigmoid -DJAX_NVFP4_ROUTE_LAB_SCORING=1" "softmax -DJAX_NVFP4_ROUTE_LAB_SCORING=2"
          "sig_all -DJAX_NVFP4_ROUTE_LAB_SCORING=1 -DJAX_NVFP4_ROUTE_FAST_MATH=1 -DJAX_NVFP4_ROUTE_ALIGN_UNROLL=4"
          "soft_all -DJAX_NVFP4_ROUTE_LAB_SCORING=2 -DJAX_NVFP4_ROUTE_FAST_MATH=1 -DJAX_NVFP4_ROUTE_ALIGN_UNROLL=4")
pids=()
for v in "${variants[@]}"; do build $v & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid" || exit 1; done
for round in 1 2; do
  for v in "${variants[@]}"; do
    name=${v%% *}
    echo "== $name (round $round)"
    "/tmp/route_$name"
  done
done

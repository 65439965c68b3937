#!/usr/bin/env bash
# Builds kernel_lab.cu variants that differ in compile-time knobs (nvfp4_tile.cuh,
# nvfp4_kernel.cuh) in parallel and times each on a list of launches (run on the GPU machine
# from the repo root):
#   bash benchmarks/lab_defines.sh OUTDIR "NAME=-DKNOB=V,-DKNOB2=V ..." "K N M [splits [ks [tpb]]];..."
# e.g. NAME "row4=-DJAX_NVFP4_ROW_STAGES=4" and the launch "4096 14336 1 1 8 4"; or
# "r72=-DJAX_NVFP4_ROW_SMEM_KB=72" (a 1-row ring of 3 stages, three blocks per SM) with the launch
# "4096 14336 1 1 8 3" (tiles per block for a wave of 396 blocks).
set -uo pipefail
out=$1; variants=$2; launches=$3
mkdir -p "$out"
for v in $variants; do
  name=${v%%=*}; defs=${v#*=}
  nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -lineinfo -I csrc --expt-relaxed-constexpr \
    -diag-suppress=940,2473,177 ${defs//,/ } benchmarks/kernel_lab.cu -o "$out/lab_$name" &
done
wait
IFS=';' read -ra shapes <<< "$launches"
for v in $variants; do
  name=${v%%=*}
  for shape in "${shapes[@]}"; do
    printf '%-10s ' "$name"
    "$out/lab_$name" $shape
  done
done

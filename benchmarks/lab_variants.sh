#!/usr/bin/env bash
# Builds kernel_lab.cu variants in parallel and times them (run on the GPU machine from the repo
# root): bash benchmarks/lab_variants.sh OUTDIR "C:S C:S ..." (chunks per stage : decode stages).
set -uo pipefail
out=${1:-/tmp/lab}; variants=${2:-"1:8 2:4 2:3 4:2"}
mkdir -p "$out"
for v in $variants; do
  c=${v%%:*}; s=${v##*:}
  nvcc -std=c++17 -O3 -arch=sm_90a -lineinfo -I csrc --expt-relaxed-constexpr -diag-suppress=940,2473,177 \
    -DJAX_NVFP4_CHUNKS_PER_STAGE=$c -DJAX_NVFP4_DECODE_STAGES=$s benchmarks/kernel_lab.cu -o "$out/lab_${c}_${s}" &
done
wait
for v in $variants; do
  c=${v%%:*}; s=${v##*:}
  for shape in "4096 14336 1" "14336 4096 1" "8192 28672 1" "4096 4096 1" "4096 14336 16" "14336 4096 16"; do
    "$out/lab_${c}_${s}" $shape
  done
done

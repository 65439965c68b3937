#!/usr/bin/env bash
# A/B of the 8-slice decode block against the 4-slice block (4 k-slices of 2 N tiles: one
# hand-off and epilogue per 2 N tiles and 16 k64 chunks instead of per N tile and 32 chunks)
# at M = 1-4, one wave of blocks each (tiles per block 0), in two interleaved rounds; the first
# round checks each launch against the plain launch (LAB_CHECK).
# Run on the GPU machine from the repo root:  bash benchmarks/ab_four_k_slices.sh > OUT.txt
set -uo pipefail
source benchmarks/lab_ab.sh
# LAB_PREBUILT=1: /tmp/lab_ks is already built from this tree.
[ -n "${LAB_PREBUILT:-}" ] || build_lab ks || exit 1
shapes="4096 14336 1;14336 4096 1;8192 28672 1;4096 4096 1;4096 57344 1;2048 57344 1;4096 14336 2;4096 14336 4;8192 28672 4"
IFS=';' read -ra list <<< "$shapes"
for round in 1 2; do
  echo "== round $round"
  check=$([ "$round" = 1 ] && echo 1)  # empty: off (kernel_lab env_flag)
  for shape in "${list[@]}"; do
    for ks in 8 4; do
      LAB_CHECK=$check /tmp/lab_ks $shape 1 $ks 0
    done
  done
done
echo "== bare reads"
for shape in "4096 14336 1" "8192 28672 1" "4096 57344 1" "2048 57344 1" "4096 4096 1"; do
  LAB_READ_ONLY=1 /tmp/lab_ks $shape
done

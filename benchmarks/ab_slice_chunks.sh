#!/usr/bin/env bash
# Chunks per k-slice at m_tile 1 (NOTES_dense.md v22), one device call, output under $OUT:
#   bash benchmarks/ab_slice_chunks.sh
# kernel_lab, two interleaved rounds (the first checked against the plain launch): 8 k-slices
# (slices of 4 chunks; 8 would make an x row wider than the block's 256 threads copy in one
# column), and 4 k-slices with slices of 4 chunks (c4: -DJAX_NVFP4_PAIR_KSLICE_CHUNKS_SHORT=4,
# v21's extension) or 8 (c8: -DJAX_NVFP4_PAIR_KSLICE_CHUNKS=8, a unit as long as the 8-slice
# block's), at M = 1, 4 (short x tiles; the extension now takes 8 there) and 8 (the 8-row tile:
# one block per SM at 8 chunks; the extension keeps 4).
set -uo pipefail
source benchmarks/lab_ab.sh
build_labs "c4 -DJAX_NVFP4_PAIR_KSLICE_CHUNKS_SHORT=4" "c8 -DJAX_NVFP4_PAIR_KSLICE_CHUNKS=8" || exit 1
launches() {
  local check=$1 shape lab
  for shape in "4096 14336 1" "14336 4096 1" "8192 28672 1" "4096 4096 1" "4096 57344 1" \
               "4096 14336 4" "8192 28672 4" "4096 14336 8" "14336 4096 8" "8192 28672 8"; do
    printf 'c4 '; LAB_CHECK=$check /tmp/lab_c4 $shape 1 8 0
    for lab in c4 c8; do
      printf '%s ' $lab; LAB_CHECK=$check /tmp/lab_$lab $shape 1 4 0
    done
  done
}
two_rounds lab_chunks launches

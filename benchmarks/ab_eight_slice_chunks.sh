#!/usr/bin/env bash
# The 8-slice block's short x tiles (1, 2, 4 rows) with slices of 8 k64 chunks instead of 4
# (NOTES_dense.md v22 Next: -DJAX_NVFP4_KSLICE_CHUNKS_SHORT=8, a unit of K 4096; the x copy
# now takes rows wider than the block's threads). One device call, output under $OUT:
#   bash benchmarks/ab_eight_slice_chunks.sh
# kernel_lab, two interleaved rounds (the first checked against the plain launch): 8 slices
# with 4-chunk (c4, v22's extension: -DJAX_NVFP4_LONG_SLICES=0, since v23 launches long slices
# itself where K % 4096 == 0) and 8-chunk (c8) slices at every K, and the 4-slice block (the
# same in both builds) for reference. Ran: results/ab_eight_slice_chunks_h200_2026-12-04.txt.
set -uo pipefail
source benchmarks/lab_ab.sh
build_labs "c4 -DJAX_NVFP4_LONG_SLICES=0" "c8 -DJAX_NVFP4_KSLICE_CHUNKS_SHORT=8" || exit 1
launches() {
  local check=$1 shape lab
  for shape in "8192 28672 1" "8192 28672 2" "8192 28672 4" "4096 14336 1" "14336 4096 1" \
               "4096 4096 1" "4096 57344 1" "2048 57344 1"; do
    for lab in c4 c8; do
      printf '%s ' $lab; LAB_CHECK=$check /tmp/lab_$lab $shape 1 8 0
    done
    printf 'c4 '; LAB_CHECK=$check /tmp/lab_c4 $shape 1 4 0
  done
}
two_rounds lab_eight_chunks launches

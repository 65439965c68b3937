#!/usr/bin/env bash
# Where a dense launch's time goes, block by block (kernel_lab built with
# -DJAX_NVFP4_LAB_TIMELINE=1: start offsets, time to the first landed unit, the steady loop,
# the last hand-off and epilogue, end times, as percentiles over the blocks), for the launches
# the extension picks on an H200 at M = 1, 8 and 16 on the benchmark shapes (NOTES_dense.md v25
# says why), and the bare read of the same bytes for scale. One device call, output under
# $OUT:  bash benchmarks/timeline_lab.sh
set -uo pipefail
source benchmarks/lab_ab.sh
build_labs "timeline -DJAX_NVFP4_LAB_TIMELINE=1" || exit 1
{
  # M = 1 and 8: the k-sliced launches (4 or 8 slices, one wave of blocks).
  for args in "4096 14336 1 1 4 0" "14336 4096 1 1 4 0" "8192 28672 1 1 8 0" "4096 4096 1 1 4 0" \
              "8192 28672 8 1 8 0" "4096 14336 8 1 4 0"; do
    /tmp/lab_timeline $args
  done
  # M = 16: 2-split cluster, 8 k-slices at m_tile 2, unsplit.
  for args in "4096 14336 16" "14336 4096 16 1 8 0" "8192 28672 16"; do
    /tmp/lab_timeline $args
  done
  for shape in "4096 14336" "8192 28672"; do LAB_READ_ONLY=1 /tmp/lab_timeline $shape 1; done
} 2>&1 | tee "$out/timeline_lab.txt"

#!/usr/bin/env bash
# M = 5-8 (the 8-row k-sliced tile): 8 against 4 k-slices on the benchmark shapes and two long-N
# ones, for choose_slice_count's 8-row decisions (NOTES_dense.md v23 Noticed: 14336x4096 at
# M = 8 took 4 slices, 15.6 us in the lab, where 8 ran 15.0). One device call, output under $OUT:
#   bash benchmarks/ab_rows_five_to_eight.sh
# kernel_lab (the extension's kernels), two interleaved rounds, the first checked against the
# plain launch. Prepared, not yet run.
set -uo pipefail
source benchmarks/lab_ab.sh
build_lab main || exit 1
launches() {
  local check=$1 shape m ks
  for shape in "4096 14336" "14336 4096" "8192 28672" "4096 4096" "4096 57344"; do
    for m in 5 8; do
      for ks in 8 4; do
        LAB_CHECK=$check /tmp/lab_main $shape $m 1 $ks 0
      done
    done
  done
}
two_rounds lab_rows_five_to_eight launches

#!/usr/bin/env bash
# The next k-slice questions in one device call (NOTES_dense.md v21, NOTES_moe.md v20 Next).
# Ran on 94cea42 (results/ab_slices_next_h200_2026-12-04.txt, NOTES_dense.md v22); since v22
# the extension's 4-slice short tiles take 8-chunk slices, so `main` below is no longer v21's.
# Run on the GPU machine from the repo root; output under $OUT:
#   bash benchmarks/ab_slices_next.sh
# 1. M = 16 (kernel_lab, two interleaved rounds, the first checked against the plain launch):
#    the plain launch (m_tile 2, split K as dense.choose_launch), m_tile 2 with 8 or 4 k-slices
#    (4: lab-only), and M = 16 as two m_tile-1 token tiles (LAB_MT=1) with 8 or 4 k-slices;
#    the m_tile-2 k-sliced blocks also with slices of 4 chunks instead of 2
#    (-DJAX_NVFP4_KSLICE_CHUNKS_MT2=4: one block per SM).
# 2. M = 1: the 4-slice block with slices of 8 chunks instead of 4
#    (-DJAX_NVFP4_PAIR_KSLICE_CHUNKS=8: a unit as long as the 8-slice block's, half the barriers
#    and ring bookkeeping per byte; 2 stages of 40-52 KB instead of 3-4 of 20-34 KB at 1-4
#    rows, one block per SM at 8 rows).
# 3. The grouped GEMM with 4 k-slices at every decode GEMM, or where K is a whole number of
#    4-slice units (profile_moe.py variants ksliced4, ksliced4_units) at T = 1, 2, 16.
set -uo pipefail
source benchmarks/lab_ab.sh
build_labs main "mt2c4 -DJAX_NVFP4_KSLICE_CHUNKS_MT2=4" "pair8 -DJAX_NVFP4_PAIR_KSLICE_CHUNKS=8" &
labs=$!
bash benchmarks/device_run.sh build || exit 1
wait $labs || exit 1
m16_launches() {
  local check=$1 shape ks
  for shape in "4096 14336" "14336 4096" "8192 28672" "4096 4096"; do
    LAB_CHECK=$check /tmp/lab_main $shape 16
    for ks in 8 4; do
      LAB_CHECK=$check /tmp/lab_main $shape 16 1 $ks 0
      LAB_CHECK=$check LAB_MT=1 /tmp/lab_main $shape 16 1 $ks 0
      printf 'chunks4 '; LAB_CHECK=$check /tmp/lab_mt2c4 $shape 16 1 $ks 0
    done
  done
}
pair8_launches() {
  local check=$1 shape lab
  for shape in "4096 14336 1" "14336 4096 1" "4096 57344 1" "2048 57344 1" "4096 14336 4" \
               "8192 28672 1"; do
    for lab in main pair8; do
      printf '%-6s ' $lab; LAB_CHECK=$check /tmp/lab_$lab $shape 1 4 0
    done
  done
}
two_rounds lab_m16 m16_launches
two_rounds lab_pair8 pair8_launches
cd benchmarks && timeout 240 python3 profile_moe.py --tokens 1,2,16 \
  --variants fused_moe,ksliced4,ksliced4_units --out "$out/profile_ksliced4.json" 2>&1 \
  | grep -E "bandwidth|E=" | tee "$out/profile_ksliced4.txt"

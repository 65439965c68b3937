#!/usr/bin/env bash
# ncu on the decode GEMMs whose time is furthest over their bytes (run on the GPU machine after
# `device_run.sh build`; reports under $OUT/ncu_*.txt, a summary on stdout):
#   dense M = 16 on 14336x4096 (k-sliced m_tile 2) and 4096x14336 (unsliced m_tile 2), M = 1 on
#   14336x4096 (the 1-row tile) for comparison; the Qwen3-like MoE layer's GEMMs at T = 1,
#   with caches flushed before each replay (ncu's default) and without.
set -u
out=${OUT:-/tmp/out}
mkdir -p "$out"
prof() {  # name, then ncu arguments and the program
  local name=$1; shift
  timeout 150 ncu --clock-control none --set full --print-details all "$@" > "$out/ncu_$name.txt" 2>&1
  echo "== $name (rc $?)"
  grep -E "nvfp4_kernel|^ +Duration|DRAM Throughput|^ +Registers Per|Achieved Occupancy|Executed Ipc A|No Eligible|Stall" "$out/ncu_$name.txt" | head -30
}
prof dense_m16_14336x4096 -k regex:nvfp4_kernel --launch-skip 2 --launch-count 1 python3 benchmarks/profile_dense.py 16 14336 4096
prof dense_m1_14336x4096 -k regex:nvfp4_kernel --launch-skip 2 --launch-count 1 python3 benchmarks/profile_dense.py 1 14336 4096
prof dense_m16_4096x14336 -k regex:nvfp4_kernel --launch-skip 2 --launch-count 1 python3 benchmarks/profile_dense.py 16 4096 14336
prof qwen3_t1 -k regex:nvfp4_kernel --launch-skip 4 --launch-count 2 python3 benchmarks/ncu_moe_layer.py qwen3 1
prof qwen3_t1_nocacheflush --cache-control none -k regex:nvfp4_kernel --launch-skip 4 --launch-count 2 python3 benchmarks/ncu_moe_layer.py qwen3 1

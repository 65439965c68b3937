#!/usr/bin/env bash
# One device call for NOTES_dense.md v29 (lean addressing and row-group x copies made the
# default): the extension build, compute-sanitizer on memcheck_{dense,moe,route} beside every
# GPU test (SHARDS pytest processes of LIMIT seconds), then, in what is left of BUDGET seconds,
# moe_pair_lab.sh (NOTES_moe.md v27), bench_dense at M = 1 and 16 (with cuBLAS) and profile_moe
# at T = 1 and 16. Output under $OUT:
#   bash benchmarks/verify_v29.sh [SHARDS] [LIMIT] [BUDGET]
set -uo pipefail
shards=${1:-10}; limit=${2:-400}; budget=${3:-575}
out=${OUT:-/tmp/out}
mkdir -p "$out"
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }
bash benchmarks/device_run.sh build > "$out/build_main.log" 2>&1 || { tail -30 "$out/build_main.log"; exit 1; }
bash benchmarks/device_run.sh memcheck > "$out/memcheck.log" 2>&1 &
memcheck=$!
flags=(-std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr -diag-suppress=940,2473,177 -I csrc)
nvcc "${flags[@]}" benchmarks/moe_pair_lab.cu -o /tmp/moe_pair_lab &
lab1=$!
nvcc "${flags[@]}" -DJAX_NVFP4_MOE_EARLY_EXPERT=1 benchmarks/moe_pair_lab.cu -o /tmp/moe_pair_early &
lab2=$!
bash benchmarks/verify_device.sh "$shards" "$limit"
wait "$memcheck" "$lab1" "$lab2"
cat "$out/memcheck.log"
grep -h "^FAILED\|^ERROR" "$out"/verify_*.log | head -20
echo "[verify_v29] $(left) s left for the benchmarks"
# NOTES_moe.md v27 first (about a minute): the layers' GEMM pairs with and without PDL.
if [ "$(left)" -gt 70 ]; then
  PREBUILT=1 timeout "$(( $(left) - 10 ))" bash benchmarks/moe_pair_lab.sh
fi
if [ "$(left)" -gt 90 ]; then
  timeout "$(( $(left) - 60 ))" python3 benchmarks/bench_dense.py --ms 1,16 \
    --out "$out/dense_v29.json" > "$out/dense_v29.txt" 2>&1
  tail -n 14 "$out/dense_v29.txt"
fi
if [ "$(left)" -gt 50 ]; then
  (cd benchmarks && timeout "$(( $(left) - 5 ))" python3 profile_moe.py --tokens 1,16 \
     --variants fused_moe --out "$out/profile_moe_v29.json" | grep span)
fi

#!/usr/bin/env bash
# One device call for what sessions 39-40 built without a device: NOTES_dense.md v29 (lean
# addressing and row-group x copies made the default), NOTES_moe.md v28 (relu2 fused into GEMM 1)
# and v29 (the one-handler pair, opt-in, and its GPU test). The extension build, compute-
# sanitizer on memcheck_{dense,moe,route} beside every GPU test (SHARDS pytest processes of LIMIT
# seconds), then, in what is left of BUDGET seconds: copy_bandwidth_check.py (NOTES_dense.md
# v30), profile_moe at T = 1 and 16 with and without JAX_NVFP4_MOE_PAIR=1, moe_pair_lab.sh
# (NOTES_moe.md v27), bench_dense at M = 1 and 16
# (with cuBLAS), and the MoE notebook re-run in place (its stored relu2 figure). Output under
# $OUT:
#   bash benchmarks/verify_v30.sh [SHARDS] [LIMIT] [BUDGET]
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
echo "[verify_v30] $(left) s left for the benchmarks"
# What the roofline's copy bandwidth is, old and new method (seconds; NOTES_dense.md v30).
timeout 60 python3 benchmarks/copy_bandwidth_check.py | tee "$out/copy_bandwidth_check.txt"
# The layers with and without the pair (NOTES_moe.md v29; about two minutes), then the lab's
# bare-stream view of the same question (v27; about a minute).
if [ "$(left)" -gt 60 ]; then
  (cd benchmarks && timeout "$(( $(left) - 5 ))" python3 profile_moe.py --tokens 1,16 \
     --variants fused_moe,pair --out "$out/profile_moe_v30.json" | grep span)
fi
if [ "$(left)" -gt 70 ]; then
  PREBUILT=1 timeout "$(( $(left) - 10 ))" bash benchmarks/moe_pair_lab.sh
fi
if [ "$(left)" -gt 90 ]; then
  timeout "$(( $(left) - 45 ))" python3 benchmarks/bench_dense.py --ms 1,16 \
    --out "$out/dense_v30.json" > "$out/dense_v30.txt" 2>&1
  tail -n 14 "$out/dense_v30.txt"
fi
if [ "$(left)" -gt 40 ]; then
  timeout "$(( $(left) - 2 ))" python3 scripts/run_notebooks.py --inplace notebooks/02_moe.ipynb \
    && cp notebooks/02_moe.ipynb "$out/"
fi

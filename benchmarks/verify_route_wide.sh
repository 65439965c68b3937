#!/usr/bin/env bash
# One device call that settles the wide decode routing kernel (NOTES_moe.md v24, v26: the
# default where route_lab measured it faster, JAX_NVFP4_ROUTE_WIDE=1 wherever it fits): the
# whole routing suite (the wide tests, the default's kernel choice), memcheck_route (every wide
# launch against the general kernel, bit for bit) under compute-sanitizer memcheck and
# racecheck, route_lab (cold/warm us of the decode and wide kernels, and thread 0's cycles per
# phase), and the layers with the default, without the wide kernel and with it wherever it fits.
# Run on the GPU machine from the repo root (results under $OUT; ~7-9 minutes):
#   bash benchmarks/verify_route_wide.sh
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
flags=(-std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr -diag-suppress=940,2473,177 -I csrc)
nvcc "${flags[@]}" benchmarks/memcheck_route.cu -o /tmp/memcheck_route &
nvcc "${flags[@]}" benchmarks/route_lab.cu -o /tmp/route_lab &
nvcc "${flags[@]}" -DJAX_NVFP4_ROUTE_LAB_CLOCK=1 benchmarks/route_lab.cu -o /tmp/route_clock &
bash benchmarks/device_run.sh build || exit 1
wait
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_moe_route_align.py 2>&1 | tail -4
timeout 120 compute-sanitizer --tool memcheck /tmp/memcheck_route > "$out/memcheck_route_wide.txt" 2>&1
echo "[verify_route_wide] memcheck: exit $?; $(tail -2 "$out/memcheck_route_wide.txt" | tr '\n' ' ')"
timeout 120 compute-sanitizer --tool racecheck /tmp/memcheck_route > "$out/racecheck_route_wide.txt" 2>&1
echo "[verify_route_wide] racecheck: exit $?; $(tail -1 "$out/racecheck_route_wide.txt")"
for lab in route_lab route_clock; do timeout 60 stdbuf -oL "/tmp/$lab" | tee "$out/$lab.txt"; done
(cd benchmarks && timeout 180 python3 profile_moe.py --tokens 1,16 --variants fused_moe,route_decode,route_wide \
   --out "$out/profile_moe_route_wide.json" | grep span)

#!/usr/bin/env bash
# One device call's worth of work (run on the GPU machine from the repo root, output under $OUT):
#   bash benchmarks/device_run.sh build         the extension for sm_90a (pip, no network)
#   bash benchmarks/device_run.sh test FILES..  pytest on the given GPU test files
#   bash benchmarks/device_run.sh bench ARGS..  benchmarks/bench_dense.py ARGS
#   bash benchmarks/device_run.sh memcheck      memcheck_{dense,moe,route}.cu under
#                                               compute-sanitizer memcheck (route: racecheck
#                                               too; no JAX; needs no build step)
# Steps can be chained: device_run.sh build && device_run.sh test tests/test_dense_gpu.py
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
source benchmarks/lab_ab.sh  # build_extension
step=$1; shift
case "$step" in
  build)
    start=$(date +%s)
    build_extension build.log || exit 1  # the shipped build: no lab defines
    echo "[device_run] built in $(( $(date +%s) - start )) s"
    python3 -c 'import jax, jax_nvfp4._C as c; print(jax.devices(), c.built_with_cuda())' ;;
  test)
    python3 -m pytest -q -ra -p no:cacheprovider "$@" 2>&1 | tee "$out/test_$(date +%s).log" | tail -25 ;;
  bench)
    python3 benchmarks/bench_dense.py "$@" 2>&1 | tee "$out/bench_$(date +%s).log" ;;
  memcheck)
    for what in dense moe route; do
      nvcc -std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr -diag-suppress=940,2473,177 \
        -I csrc "benchmarks/memcheck_$what.cu" -o "/tmp/memcheck_$what" || exit 1
      compute-sanitizer --tool memcheck "/tmp/memcheck_$what" > "$out/memcheck_$what.txt" 2>&1
      echo "[device_run] memcheck_$what: exit $?; $(tail -2 "$out/memcheck_$what.txt" | tr '\n' ' ')"
    done
    compute-sanitizer --tool racecheck /tmp/memcheck_route > "$out/racecheck_route.txt" 2>&1
    echo "[device_run] racecheck_route: exit $?; $(tail -2 "$out/racecheck_route.txt" | tr '\n' ' ')" ;;
  *) echo "unknown step $step"; exit 2 ;;
esac

#!/usr/bin/env bash
# The kernels' sm_80 code (what an A100, A10 or L4 runs: mma.sync for every token tile, split K
# reduced through tickets, no cluster, no overlapped launch) on the lent H100/H200. The shipped
# build holds sm_90a SASS for these GPUs, so its sm_80 code never runs here; built as sm_80 PTX
# only (JAX_NVFP4_CUDA_ARCHS=80-virtual), the driver compiles that PTX for
# the GPU and the same tests run the A100's code paths (not its shared-memory size, its SM count
# or its timings). Steps: the build; what the driver loaded (`_ffi.loaded_code`: arch 80, no PDL,
# cluster limit 0); memcheck_{dense,moe} as sm_80 PTX under compute-sanitizer; every GPU test
# but the SASS checks. Leaves the sm_80 build in place: the next call's `device_run.sh build`
# rebuilds sm_90a. The tests outlast one call beside the build (2026-12-05: 406 of the dense and
# MoE files' 427 in two calls): the next call on the same warm machine runs the rest without a
# build, `IDS=<verify_unrun.txt copied into the tree> SASS=0 CUDA_CACHE_MAXSIZE=4294967296 bash
# benchmarks/verify_device.sh`.
# Output under $OUT:
#   bash benchmarks/verify_sm80_code.sh [SHARDS] [LIMIT]
set -uo pipefail
shards=${1:-8}; limit=${2:-400}
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CUDA_CACHE_MAXSIZE=4294967296  # keep every kernel the driver compiles
source benchmarks/lab_ab.sh  # build_extension
start=$(date +%s)
BUILD_ARCHS=80-virtual build_extension build_sm80.log || exit 1
echo "[sm80] built in $(( $(date +%s) - start )) s"
python3 - <<'EOF' 2>&1 | tee "$out/sm80_loaded_code.txt"
import jax
from jax_nvfp4 import _ffi
print(jax.devices()[0].device_kind, "built for", _ffi.cuda_architectures())
for moe in (False, True):
  for m_tile in (1, 2, 4, 8):
    print("moe" if moe else "dense", "m_tile", m_tile, _ffi.loaded_code(m_tile, True, moe))
EOF
flags=(-std=c++17 -O3 -gencode arch=compute_80,code=compute_80 --expt-relaxed-constexpr
       -diag-suppress=940,2473,177 -I csrc)
for what in dense moe; do
  nvcc "${flags[@]}" "benchmarks/memcheck_$what.cu" -o "/tmp/memcheck80_$what" || exit 1
  compute-sanitizer --tool memcheck "/tmp/memcheck80_$what" > "$out/memcheck80_$what.txt" 2>&1
  echo "[sm80] memcheck_$what: exit $?; $(grep -c '^skip' "$out/memcheck80_$what.txt") skipped;" \
       "$(tail -2 "$out/memcheck80_$what.txt" | tr '\n' ' ')"
done
SASS=0 bash benchmarks/verify_device.sh "$shards" "$limit"
echo "[sm80] done in $(( $(date +%s) - start )) s"

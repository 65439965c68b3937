#!/usr/bin/env bash
# A/B of the unsliced decode ring depth (JAX_NVFP4_DECODE_STAGES, m_tile 1 and 2) in the real
# extension: for each stage count, rebuild for sm_90a and time the MoE layers at small T
# (profile_moe.py, GPU time) and the dense M = 16 shapes that run the unsliced m_tile-2 block.
# Run on the GPU machine from the repo root: bash benchmarks/ab_decode_stages.sh "2 4 3"
# (results under $OUT). The stage counts stay in the CMake cache of build/: device_run.sh build
# resets them (a plain pip install would keep the last one).
set -uo pipefail
source benchmarks/lab_ab.sh  # build_extension, profile_layers, $out
for st in ${1:-2 4}; do
  build_extension "build_$st.log" "-DJAX_NVFP4_DECODE_STAGES=$st" || exit 1
  echo "== decode stages $st: resident blocks per SM (dense m_tile 1 / 2, MoE m_tile 1):" \
    "$(python3 -c 'from jax_nvfp4 import _ffi as f; print(f.blocks_per_sm(1, True), f.blocks_per_sm(2, True), f.moe_blocks_per_sm(1, True))')"
  profile_layers "stages$st" 1,2,16 200
  timeout 150 python3 benchmarks/bench_dense.py --shapes 4096x14336,8192x28672 --ms 16 \
    --no-torch --out "$out/dense_stages$st.json" | grep -v "^ *$" | tail -6
done

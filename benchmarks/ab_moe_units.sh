#!/usr/bin/env bash
# The unsliced m_tile-1 block (the grouped GEMM's decode launches with more than 4 token tiles:
# the Qwen3- and DeepSeek-like layers at T = 1-16, the Mixtral-like one at T = 16) with 8-chunk
# units (2 stages of 44 KB, two blocks per SM instead of three) against the default 4 chunks
# (NOTES_dense.md v24 Next). JAX_NVFP4_CHUNKS_PER_STAGE also sets m_tile 4 and 8, which these
# layers do not run at T <= 16 (block_m 8), so the MoE rows measure the m_tile-1 block alone.
# For each unit, rebuild the extension for sm_90a and time the layers (profile_moe.py, GPU time).
# Run on the GPU machine from the repo root (results under $OUT):
#   bash benchmarks/ab_moe_units.sh "4 8"     (TOKENS=1,16 for fewer rows)
# The define stays in the CMake cache of build/: device_run.sh build resets it. Run on
# 2026-12-04 (results/profile_moe_h200_2026-12-04_v22_units.txt, NOTES_moe.md v22). Since then
# the extension takes long units itself where K >= 2048 (v23): profile_moe.py --variants
# short_units,fused_moe is the same A/B in one build.
set -uo pipefail
source benchmarks/lab_ab.sh  # build_extension, profile_layers, $out
for chunks in ${1:-4 8}; do
  build_extension "build_units$chunks.log" "-DJAX_NVFP4_CHUNKS_PER_STAGE=$chunks" || exit 1
  echo "== m_tile-1 unit of $chunks chunks: resident MoE m_tile-1 blocks per SM:" \
    "$(python3 -c 'from jax_nvfp4 import _ffi as f; print(f.moe_blocks_per_sm(1, True))')"
  profile_layers "units$chunks" "${TOKENS:-1,2,16}" 240
done

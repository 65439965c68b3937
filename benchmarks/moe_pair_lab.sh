#!/usr/bin/env bash
# NOTES_moe.md v27: the two grouped GEMMs of the benchmark layers at decode back to back in one
# stream (moe_pair_lab.cu says what it measures), with the launch details ops/moe.py picks for
# them (printed by the extension: run after `device_run.sh build`): programmatic dependent
# launch off (as the layers run under XLA now), on (what one handler for both GEMMs would get),
# and on with the expert read before the wait (lab knob JAX_NVFP4_MOE_EARLY_EXPERT: GEMM 2's
# weights warm L2 while GEMM 1 drains). One device call (~2 minutes), output under $OUT:
#   bash benchmarks/moe_pair_lab.sh
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
flags=(-std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr -diag-suppress=940,2473,177 -I csrc)
# PREBUILT=1: the two binaries are already in /tmp (verify_v30.sh builds them beside its tests).
if [ "${PREBUILT:-0}" != 1 ]; then
  nvcc "${flags[@]}" benchmarks/moe_pair_lab.cu -o /tmp/moe_pair_lab &
  nvcc "${flags[@]}" -DJAX_NVFP4_MOE_EARLY_EXPERT=1 benchmarks/moe_pair_lab.cu -o /tmp/moe_pair_early &
fi
# One line per layer: E H I TOP_K T EXPERT_ROWS and each GEMM's KS SPLITS CLUSTER TPB.
python3 - > /tmp/moe_pair_specs <<'PY'
from jax_nvfp4.moe.align import capacity, choose_block_m
from jax_nvfp4.ops import moe
for e, h, i, k in ((128, 2048, 768, 8), (256, 7168, 2048, 8), (8, 4096, 14336, 2)):
  for t in (1, 16):
    if choose_block_m(t, k, e) != 8:
      continue
    slots = capacity(t * k, e, 8)
    spec = [e, h, i, k, t, t]
    for n, kk in ((2 * i, h), (h, i)):
      ks, splits, cluster, tpb = moe.moe_launch_spec(slots, n, kk, 8, t)
      spec += [ks, splits, int(cluster), tpb]
    print(*spec)
PY
wait
cat /tmp/moe_pair_specs
while read -r spec; do
  JAX_NVFP4_PDL=0 timeout 60 /tmp/moe_pair_lab $spec
  timeout 60 /tmp/moe_pair_lab $spec
  echo -n "early expert: "; timeout 60 /tmp/moe_pair_early $spec
done < /tmp/moe_pair_specs | tee "$out/moe_pair_lab.txt"

#!/usr/bin/env bash
# A/B of two versions of the CUDA sources in one device session (same GPU, same clocks, same
# copy-bandwidth measurement): OLD_DIR holds csrc/ as it was (e.g. `git archive HEAD csrc | tar
# -x -C .ab_old`, a folder .git/info/exclude ignores, carried to the device), the working tree
# holds the new one. Builds the old sources, benchmarks, builds the working tree's, benchmarks;
# the extension is left built from the working tree. Run on the GPU machine from the repo root:
#   bash benchmarks/ab_tree.sh .ab_old/csrc NAME [old|new|both]
# (one side per device call where both do not fit one call's limit: the build directory stays
# on a warm machine, and every build starts by touching the sources it builds).
# Results: $OUT/ab_NAME_{old,new}_{dense,moe}.{json,txt}.
set -uo pipefail
old=$1; name=$2; sides=${3:-both}
[ "$sides" = both ] && sides="old new"
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
keep=$(mktemp -d)
cp -r csrc/. "$keep/"
for side in $sides; do
  if [ "$side" = old ]; then cp -r "$old/." csrc/; else cp -r "$keep/." csrc/; fi
  touch csrc/*  # the build compares times: both swaps must look newer than the last build
  bash benchmarks/device_run.sh build || { cp -r "$keep/." csrc/; exit 1; }
  timeout 200 python3 benchmarks/bench_dense.py --ms 1,16,64,256 --no-torch \
    --out "$out/ab_${name}_${side}_dense.json" > "$out/ab_${name}_${side}_dense.txt" 2>&1
  grep -E "device|M=" "$out/ab_${name}_${side}_dense.txt" | cut -c1-40,150-
  timeout 150 python3 benchmarks/bench_moe.py --tokens 1,16,64 --no-ragged \
    --out "$out/ab_${name}_${side}_moe.json" > "$out/ab_${name}_${side}_moe.txt" 2>&1
  grep -E "T=" "$out/ab_${name}_${side}_moe.txt" | cut -c1-60
done
cp -r "$keep/." csrc/

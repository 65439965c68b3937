#!/usr/bin/env bash
# Every GPU test in parallel shards (one device call, or two with IDS below): the tests marked
# `gpu` split round-robin into SHARDS pytest processes side by side (their time is mostly XLA
# compiling on the host, which has 16 cores: 498 tests in ~9 minutes with 6 shards on the H100,
# 2026-12-05), and the SASS checks. Each process has LIMIT seconds. Run on the GPU machine from the repo root after
# `device_run.sh build`:
#   bash benchmarks/verify_device.sh [SHARDS] [LIMIT]
# Logs: $OUT/verify_logs.tgz (one file: a call brings back at most 8 from $OUT) and
# $OUT/verify_unrun.txt; the summary lines are printed at the end. compute-sanitizer runs
# separately, without JAX: `device_run.sh memcheck`.
set -uo pipefail
shards=${1:-5}; limit=${2:-520}
# About 12 GiB of GPU memory per shard: 10 shards beside the memcheck drivers ran out of memory
# on an H100's 80 GB (2026-12-05: 9 tests failed, one process crashed); an H200 holds 11.
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
gib=$(( ${mib:-0} / 1024 ))
if [ "$gib" -gt 0 ] && [ "$shards" -gt $(( gib / 12 )) ]; then
  shards=$(( gib / 12 > 0 ? gib / 12 : 1 ))
  echo "[verify] $shards shards for ${gib} GiB of GPU memory"
fi
out=${OUT:-/tmp/out}
mkdir -p "$out"
logs=$(mktemp -d /tmp/verify_logs.XXXX)
# The platform allocator hands freed memory back: BFC keeps each process's peak, and six shards'
# peaks (the DeepSeek-sized cluster tests) ran out of an H100's memory (2026-12-05, stop 42).
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform
# FILES (default tests/), MARK (default gpu; empty: every test of FILES) and KEXPR (a pytest -k
# expression) narrow the run (SASS=0 leaves out tests/test_sass.py), e.g.
#   FILES="tests/test_moe_gpu.py tests/test_nnx.py" MARK= bash benchmarks/verify_device.sh 6 300
# The whole suite (~500 GPU tests, ~530 s with 6 shards) outlasts one call beside the build: the
# ids a call left unrun are written to $OUT/verify_unrun.txt; copy that file into the tree and
# pass it as IDS=FILE to run just those in the next call.
mark=${MARK-gpu}
if [ -n "${IDS:-}" ]; then
  grep "::" "$IDS" > /tmp/gpu_ids
else
  python3 -m pytest --co -q -p no:cacheprovider ${mark:+-m "$mark"} ${KEXPR:+-k "$KEXPR"} \
    ${FILES:-tests/} 2>/dev/null \
    | grep "::" > /tmp/gpu_ids
fi
echo "[verify] $(wc -l < /tmp/gpu_ids) GPU tests in $shards shards"
# An empty list would make each shard's pytest run its default paths instead.
[ -s /tmp/gpu_ids ] || { echo "[verify] no tests collected (a file missing?)"; exit 1; }
# -v names each finished test, so the ids a time limit cut off can be listed afterwards;
# --durations: where a shard's time goes (~6 s a test on the H100: mostly XLA compiling).
run_ids='import sys, pytest; sys.exit(pytest.main(["-v", "-ra", "--durations=15", "-p", "no:cacheprovider"] + open(sys.argv[1]).read().splitlines()))'
for s in $(seq 0 $((shards - 1))); do
  awk -v n="$shards" -v s="$s" 'NR % n == s' /tmp/gpu_ids > "/tmp/shard_$s"
  timeout -s INT "$limit" python3 -c "$run_ids" "/tmp/shard_$s" > "$logs/verify_shard$s.log" 2>&1 &
done
if [ "${SASS:-1}" = 1 ]; then  # SASS=0: a PTX-only build has none to check
  timeout -s INT "$limit" python3 -m pytest -q -ra -p no:cacheprovider tests/test_sass.py \
    > "$logs/verify_sass.log" 2>&1 &
fi
wait
# (Parameter ids may hold spaces: "bad5-k_slices must be 1, 4 or 8".)
sed -nE 's/^(tests\/.+::.+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)( .*)?$/\1/p' \
  "$logs"/verify_shard*.log | sort -u > /tmp/gpu_done
grep -vxFf /tmp/gpu_done /tmp/gpu_ids > "$out/verify_unrun.txt"
echo "[verify] $(wc -l < /tmp/gpu_done) tests finished, $(wc -l < "$out/verify_unrun.txt") unrun (verify_unrun.txt)"
for f in "$logs"/verify_*.log; do
  echo "== $(basename "$f"): $(grep -E "(passed|failed|skipped|errors?) in [0-9.]+s" "$f" | tail -1)"
done
grep -h "^FAILED\|^ERROR" "$logs"/verify_*.log | head -20
tar czf "$out/verify_logs.tgz" -C "$logs" .

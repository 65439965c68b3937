#!/usr/bin/env bash
# Every GPU test in parallel shards (one device call, or two with IDS below): the tests marked
# `gpu` split round-robin into SHARDS pytest processes side by side (their time is mostly XLA
# compiling on the host, which has 16 cores: on the H100 on 2026-12-05, 6 shards finished 365 of
# the 498 tests in 400 s, so the whole suite needs ~530 s of each), and the SASS checks. Each
# process has LIMIT seconds. Run on the GPU machine from the repo root after
# `device_run.sh build`:
#   bash benchmarks/verify_device.sh [SHARDS] [LIMIT]
# Output: $OUT/verify_logs.tgz (one file: a call brings back at most 8 from $OUT; re-packed every
# 30 s, so that a call cut off by its own limit still brings back what ran) and
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
work=$(mktemp -d /tmp/verify.XXXX)  # the id lists and the logs of this run
logs=$work/logs
mkdir -p "$logs"
# The platform allocator hands freed memory back: BFC keeps each process's peak, and six shards'
# peaks (the DeepSeek-sized cluster tests) ran out of an H100's memory (2026-12-05, stop 42).
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform
# FILES (default tests/), MARK (default gpu; empty: every test of FILES) and KEXPR (a pytest -k
# expression) narrow the run (SASS=0 leaves out tests/test_sass.py), e.g.
#   FILES="tests/test_moe_gpu.py tests/test_nnx.py" MARK= bash benchmarks/verify_device.sh 6 300
# The whole suite outlasts one call beside the build: the ids a call left unrun are written to
# $OUT/verify_unrun.txt; copy that file into the tree and pass it as IDS=FILE to run just those
# in the next call (FILES, MARK and KEXPR do not apply then).
collect() { python3 -m pytest --co -q -p no:cacheprovider "$@" 2>/dev/null | grep "::"; }
if [ -n "${IDS:-}" ]; then
  # Only ids this tree still has: pytest ends a whole shard at the first id it cannot find.
  grep "::" "$IDS" | sed 's/[[:space:]]*$//' > "$work/asked"
  for f in $(cut -d: -f1 "$work/asked" | sort -u); do [ -f "$f" ] && echo "$f"; done \
    > "$work/files"  # a file that is gone would fail the whole collection
  [ -s "$work/files" ] && collect $(cat "$work/files") | grep -xFf "$work/asked" > "$work/ids"
  touch "$work/ids"
  dropped=$(( $(wc -l < "$work/asked") - $(wc -l < "$work/ids") ))
  [ "$dropped" -gt 0 ] && echo "[verify] $dropped ids of $IDS are not in this tree: left out"
else
  mark=${MARK-gpu}
  collect ${mark:+-m "$mark"} ${KEXPR:+-k "$KEXPR"} ${FILES:-tests/} > "$work/ids"
fi
total=$(wc -l < "$work/ids")
# An empty list would make a shard's pytest run its default paths instead.
[ "$total" -gt 0 ] || { echo "[verify] no tests to run (a file missing?)"; exit 1; }
[ "$shards" -gt "$total" ] && shards=$total
echo "[verify] $total GPU tests in $shards shards"

# (Parameter ids may hold spaces: "bad5-k_slices must be 1, 4 or 8".)
report() {
  sed -nE 's/^(tests\/.+::.+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)( .*)?$/\1/p' \
    "$logs"/verify_shard*.log 2>/dev/null | sort -u | grep -xFf "$work/ids" > "$work/done"
  grep -vxFf "$work/done" "$work/ids" > "$work/unrun"
  cp "$work/unrun" "$out/verify_unrun.txt"
  tar czf "$work/logs.tgz" -C "$logs" . && cp "$work/logs.tgz" "$out/verify_logs.tgz"
}
pids=() packer=
# Stopped from outside (the device call's own limit): the shards stop too, and what ran is kept.
trap 'kill -TERM "${pids[@]}" $packer 2>/dev/null; report; exit 130' INT TERM

# -v names each finished test, so the ids a time limit cut off can be listed afterwards;
# --durations: where a shard's time goes (~6 s a test on the H100: mostly XLA compiling).
run_ids='import sys, pytest; sys.exit(pytest.main(["-v", "-ra", "--durations=15", "-p", "no:cacheprovider"] + open(sys.argv[1]).read().splitlines()))'
for s in $(seq 0 $((shards - 1))); do
  awk -v n="$shards" -v s="$s" 'NR % n == s' "$work/ids" > "$work/shard_$s"
  timeout -k 30 -s INT "$limit" python3 -c "$run_ids" "$work/shard_$s" \
    > "$logs/verify_shard$s.log" 2>&1 &
  pids+=($!)
done
if [ "${SASS:-1}" = 1 ]; then  # SASS=0: a PTX-only build has none to check
  timeout -k 30 -s INT "$limit" python3 -m pytest -q -ra -p no:cacheprovider tests/test_sass.py \
    > "$logs/verify_sass.log" 2>&1 &
  pids+=($!)
fi
(while sleep 30; do report; done) &
packer=$!
rcs=()
for pid in "${pids[@]}"; do
  wait "$pid"
  rcs+=($?)
done
kill "$packer" 2>/dev/null
wait "$packer" 2>/dev/null
report
echo "[verify] $(wc -l < "$work/done") tests finished, $(wc -l < "$work/unrun") unrun" \
     "(verify_unrun.txt); rc 124: the time limit, 1: a test failed, 139 / 134: a crash"
for i in "${!rcs[@]}"; do  # the shards in order, then the SASS checks
  f=$logs/verify_shard$i.log
  [ "$i" -lt "$shards" ] || f=$logs/verify_sass.log
  summary=$(grep -E "(passed|failed|skipped|errors?|warnings?|deselected|no tests ran).* in [0-9.]+s" "$f" | tail -1)
  echo "== $(basename "$f") (rc ${rcs[$i]}): $summary"
done
grep -h "^FAILED\|^ERROR" "$logs"/verify_*.log | head -20

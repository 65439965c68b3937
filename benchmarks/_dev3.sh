bash benchmarks/device_run.sh build || exit 1
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
for s in 0 1 2 3 4 5; do awk -v s=$s 'NR % 6 == s' benchmarks/_rest_ids > /tmp/rest_$s
  timeout -s INT 200 python3 -m pytest -q -p no:cacheprovider $(cat /tmp/rest_$s) > $OUT/rest_$s.log 2>&1 & done
wait
for s in 0 1 2 3 4 5; do echo "rest_$s: $(tail -1 $OUT/rest_$s.log)"; done
grep -h "FAILED" $OUT/rest_*.log | head
cd benchmarks && timeout 100 python3 profile_moe.py --tokens 1 --variants fused_moe,unfused --out $OUT/profile_moe_v17_fast.json 2>&1 | grep -v "^W\|^I0" | tee $OUT/profile_moe_v17_fast.txt
timeout 150 python3 bench_dense.py --ms 1,16 --out $OUT/dense_v17.json 2>&1 | grep -v "^W\|^I0" | tail -14

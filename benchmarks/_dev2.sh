bash benchmarks/device_run.sh build || exit 1
bash benchmarks/verify_device.sh 6 350
grep -h "FAILED\|Error:" $OUT/verify_*.log | head -20
cd benchmarks && timeout 150 python3 profile_moe.py --tokens 1,16 --variants fused_moe,unfused --out $OUT/profile_moe_v17.json 2>&1 | grep -v "^W\|^I0" | tee $OUT/profile_moe_v17.txt

# Helpers of the kernel_lab A/B scripts (benchmarks/ab_*.sh); source it from the repo root on
# the GPU machine. Results go under $out (${OUT:-/tmp/out}).
out=${OUT:-/tmp/out}
mkdir -p "$out"
# The extension itself for sm_90a (pip, no network; BUILD_ARCHS=80-virtual: sm_80 PTX only, see
# verify_sm80_code.sh), its CUDA flags set to DEFINES ("" for the shipped build), the log in
# $out/LOG; prints the log's tail and fails if the build failed.
build_extension() {  # LOG [DEFINES]
  local log=$1 defines=${2:-}
  # The sources arrive with this checkout's mtimes, which can be older than objects left in
  # build/ by an earlier call on the same machine: ninja would then keep those objects.
  touch csrc/*
  # CMAKE_CUDA_FLAGS always set: a define stays in the CMake cache of build/ otherwise, and the
  # next build would silently keep it.
  JAX_NVFP4_CUDA_ARCHS=${BUILD_ARCHS:-90a} python3 -m pip install -q --no-build-isolation \
    --no-deps -e . \
    -C cmake.define.CMAKE_CUDA_FLAGS="$defines" > "$out/$log" 2>&1 \
    || { tail -40 "$out/$log"; return 1; }
}
# The MoE layers through the extension as it is built now (profile_moe.py, GPU time per layer):
# $out/profile_moe_NAME.{json,txt}; prints the layers' span lines.
profile_layers() {  # NAME TOKENS [TIMEOUT_S]
  (cd benchmarks && timeout "${3:-300}" python3 profile_moe.py --tokens "$2" --variants fused_moe \
     --out "$out/profile_moe_$1.json") 2>&1 | tee "$out/profile_moe_$1.txt" | grep span
}
build_lab() {  # NAME DEFINES...: kernel_lab for sm_90a with the given -D knobs, as /tmp/lab_NAME
  local name=$1; shift
  nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -I csrc --expt-relaxed-constexpr \
    -diag-suppress=940,2473,177 "$@" benchmarks/kernel_lab.cu -o "/tmp/lab_$name"
}
# Builds several labs side by side, each spec "NAME DEFINES..." as build_lab takes it; fails if
# any build failed (a lab left in /tmp by an earlier call does not count).
build_labs() {  # SPEC...
  local spec pids=() status=0 pid
  for spec in "$@"; do
    build_lab $spec &  # unquoted: NAME and each define are separate words
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  return $status
}
# Runs RUN (a function of the LAB_CHECK value: 1 in round 1, empty in round 2) in two
# interleaved rounds into $out/NAME.txt, then prints the timings and the worst check.
two_rounds() {  # NAME RUN
  local name=$1 run=$2 round
  for round in 1 2; do
    echo "== round $round"
    "$run" "$([ "$round" = 1 ] && echo 1)"
  done > "$out/$name.txt" 2>&1
  grep -v "^  check" "$out/$name.txt" | sed 's/chunks\/stage=4 stages=2 //' | cut -c1-140
  echo "checks: $(grep -c 'rel-L2' "$out/$name.txt"), worst:" \
       "$(grep -o 'rel-L2 [0-9.e+-]*' "$out/$name.txt" | sort -k2 -g | tail -1)"
}
# Whether every lab's launches in $out/NAME.txt (round 1) wrote main's bytes (the output hash
# kernel_lab prints with LAB_CHECK, launches in the same order per lab): for knobs that must not
# change a stored bit. Prints one verdict line, and the launches that differ.
same_bits_as_main() {  # NAME
  awk '/^== round 2/ { exit } /^-- / { lab = $2; i = 0 } /output hash/ { h[lab, i++] = $NF; n[lab] = i }
       END { bad = 0
             for (lab in n) if (lab != "main") for (j = 0; j < n[lab]; ++j)
               if (h[lab, j] != h["main", j]) { print "DIFFERS from main: " lab " launch " j; bad = 1 }
             print bad ? "bitwise: NOT equal to main" : "bitwise: every launch equal to main" }' \
    "$out/$1.txt"
}

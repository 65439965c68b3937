# Sourced by scripts/demo.sh and scripts/test.sh: makes ./.venv (Python >= 3.12) with jax_nvfp4
# installed in editable mode, its CUDA kernels built when nvcc is found. Idempotent and quick on
# the second run.
#
# Knobs (environment):
#   JAX_NVFP4_PYTHON=/path/python   interpreter to build the venv from (default: first >= 3.12 found)
#   JAX_NVFP4_CUDA_ARCHS="90a"      CUDA archs to build (default 80;86;89;90a)
#   JAX_NVFP4_DISABLE_CUDA=ON       skip the CUDA kernels
#   JAX_NVFP4_OFFLINE=1             never reach a package index: the interpreter must already have
#                                   jax>=0.11, numpy, ml_dtypes, nanobind, scikit-build-core, cmake
#                                   (and pytest for the tests; flax, safetensors and matplotlib
#                                   for the tests that need them, skipped otherwise); the venv
#                                   sees its site-packages.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

_py_ok() {  # is $1 a Python >= 3.12?
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1
}

_has_jax() {  # does $1 already import jax (e.g. a machine with a preinstalled CUDA jax)?
  "$1" -c 'import jax' >/dev/null 2>&1
}

find_python() {
  if [ -n "${JAX_NVFP4_PYTHON:-}" ]; then echo "$JAX_NVFP4_PYTHON"; return; fi
  local c p candidates=()
  for c in python3 python3.14 python3.13 python3.12 \
           "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3 /usr/local/bin/python3.1[2-9] \
           /usr/bin/python3.1[2-9]; do
    p="$(command -v "$c" 2>/dev/null)" || continue
    _py_ok "$p" && candidates+=("$p")
  done
  # Prefer an interpreter whose jax is already installed (offline machines), else the first.
  for p in "${candidates[@]}"; do
    if _has_jax "$p"; then echo "$p"; return; fi
  done
  if [ "${#candidates[@]}" -gt 0 ]; then echo "${candidates[0]}"; return; fi
  echo "jax_nvfp4 needs Python >= 3.12 (jax >= 0.11 does); set JAX_NVFP4_PYTHON" >&2
  return 1
}

# A venv from an older Python (or one whose creation stopped before pip, e.g. a missing
# python3-venv package) cannot install jax >= 0.11: make it again.
if [ -x "$VENV/bin/python" ] && { ! _py_ok "$VENV/bin/python" ||
     ! "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; }; then
  echo "[setup] $VENV is not a usable Python >= 3.12 venv with pip ($("$VENV/bin/python" --version 2>&1)): recreating it"
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)"
  echo "[setup] creating $VENV from $PY ($("$PY" --version))"
  "$PY" -m venv --system-site-packages "$VENV"
  # --system-site-packages only reaches the base installation; when $PY is itself a venv,
  # make its packages visible too.
  "$PY" - "$VENV" <<'PY'
import pathlib, site, sys, sysconfig
if sys.prefix != sys.base_prefix:
  venv = pathlib.Path(sys.argv[1])
  ours = next(venv.glob("lib/python*/site-packages"))
  paths = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  (ours / "_jax_nvfp4_parent_env.pth").write_text("\n".join(sorted(paths)) + "\n")
PY
fi
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)

JAX_REQ="jax>=0.11"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  JAX_REQ="jax[cuda13]>=0.11"
fi
REQS=("$JAX_REQ" "numpy>=1.26" "ml_dtypes>=0.5" "scikit-build-core>=0.10" "nanobind>=2.0"
      "cmake>=3.24" "ninja" "pytest>=8" "flax>=0.11" "safetensors>=0.4" "matplotlib>=3.8")

stamp="$VENV/.jax_nvfp4_stamp"
# Rebuild when the sources change, and when the machine does: a GPU (jax[cuda13]) or nvcc that
# appeared since the last build.
want="$(cat "$ROOT/pyproject.toml" "$ROOT/CMakeLists.txt" "$ROOT"/csrc/* 2>/dev/null | sha256sum | cut -c1-16)-${JAX_NVFP4_CUDA_ARCHS:-default}-${JAX_NVFP4_DISABLE_CUDA:-OFF}-$JAX_REQ-$(command -v nvcc || echo no-nvcc)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if [ "${JAX_NVFP4_OFFLINE:-0}" = "1" ]; then
    "$VENV/bin/python" - <<'PY'
import importlib.util, sys
missing = [m for m in ("jax", "numpy", "ml_dtypes", "nanobind", "scikit_build_core")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"[setup] offline and missing: {missing}")
PY
  else
    echo "[setup] installing requirements into $VENV"
    "${PIP[@]}" install "${REQS[@]}"
    # With CUDA 13's nvcc, its disassembler too (NVIDIA's wheels, 6 MB): tests/test_sass.py then
    # checks the built kernels' machine code (tensor-core instructions, no local memory) on
    # machines without a CUDA toolkit's cuobjdump, CI's included.
    if command -v nvcc >/dev/null 2>&1 && ! command -v cuobjdump >/dev/null 2>&1 &&
       nvcc --version | grep -q "release 13\."; then
      "${PIP[@]}" install "nvidia-cuda-cuobjdump>=13,<14" "nvidia-cuda-nvdisasm>=13,<14" ||
        echo "[setup] no cuobjdump wheel: tests/test_sass.py will skip"
    fi
  fi
  echo "[setup] building jax_nvfp4 (CUDA kernels: $(command -v nvcc >/dev/null && echo "nvcc found" || echo "no nvcc"))"
  "${PIP[@]}" install --no-build-isolation --no-deps -e "$ROOT"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
for tools in "$VENV"/lib/python*/site-packages/nvidia/cu*/bin; do
  if [ -x "$tools/cuobjdump" ]; then export PATH="$PATH:$tools"; fi  # after any system one
done
PYTHON="$VENV/bin/python"

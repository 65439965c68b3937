"""The standalone CUDA programs in benchmarks/ (kernel_lab.cu, memcheck_dense.cu,
memcheck_moe.cu, memcheck_route.cu, route_lab.cu, placement_probe.cu, moe_pair_lab.cu) include
the library's kernel headers directly, so a change to csrc/ can break them without breaking the
extension; the labs build with their instrumentation and knobs on too. They are
compiled here to PTX for sm_80 (front end and host code, no ptxas: seconds) wherever nvcc is on
the PATH, CI's CPU machine included; skipped otherwise."""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DRIVERS = [("kernel_lab.cu", ()), ("kernel_lab.cu", ("-DJAX_NVFP4_LAB_TIMELINE=1",)),
           ("kernel_lab.cu", ("-DJAX_NVFP4_WIDEN_PRMT=1",)),
           ("memcheck_dense.cu", ()), ("memcheck_moe.cu", ()), ("memcheck_route.cu", ()),
           ("route_lab.cu", ()),
           ("route_lab.cu", ("-DJAX_NVFP4_ROUTE_LAB_CLOCK=1", "-DJAX_NVFP4_ROUTE_FAST_MATH=1",
                             "-DJAX_NVFP4_ROUTE_LAB_SCORING=1")),
           ("placement_probe.cu", ()), ("moe_pair_lab.cu", ()),
           ("moe_pair_lab.cu", ("-DJAX_NVFP4_MOE_EARLY_EXPERT=1",))]


@pytest.mark.parametrize("driver, defines", DRIVERS)
def test_driver_compiles(driver, defines, tmp_path):
  nvcc = shutil.which("nvcc")
  if nvcc is None:
    pytest.skip("nvcc is not on the PATH")
  cmd = [nvcc, "-std=c++17", "-arch=compute_80", "-code=compute_80", "--expt-relaxed-constexpr",
         "-diag-suppress=940,2473,177", *defines, "-I", str(ROOT / "csrc"), "-c",
         str(ROOT / "benchmarks" / driver), "-o", str(tmp_path / "driver.o")]
  out = subprocess.run(cmd, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]


def test_library_build_has_no_lab_timeline():
  """The library's build leaves the lab timeline out (csrc/nvfp4_tile.cuh, only with
  -DJAX_NVFP4_LAB_TIMELINE=1 for benchmarks/moe_timeline.py): its hooks answer that nothing is
  recorded and nothing can be read, without touching a device."""
  from jax_nvfp4 import _ffi
  if _ffi._C is None:
    pytest.skip("the extension is not built")
  assert _ffi._C.moe_lab_timeline_reset(0) is False
  assert _ffi._C.moe_lab_timeline(4) == b""

"""The backend oracle: every case from faked device facts, no GPU needed."""

from __future__ import annotations

import logging
import re
import types

import jax
import pytest

from jax_nvfp4 import _ffi
from jax_nvfp4 import backend as B
from jax_nvfp4.backend import BackendChoice, select_backend


@pytest.fixture(autouse=True)
def _fresh_log():
  B.reset_log_once()
  yield
  B.reset_log_once()


def _cuda(cc, built=True, **kw):
  return dict(platform="cuda", compute_capability=cc, kernels_built=built, **kw)


# (id, kwargs, expected backend, expected drops_activation_scales)
CHOICES = [
    ("cpu-w4a16", dict(platform="cpu", kernels_built=False), "reference", False),
    ("cpu-built-w4a16", dict(platform="cpu", kernels_built=True), "reference", False),
    ("cpu-w4a4", dict(platform="cpu", kernels_built=False, activation_format="nvfp4"),
     "reference", True),
    ("tpu-w4a16", dict(platform="tpu", kernels_built=False), "reference", False),
    ("rocm-w4a16", dict(platform="rocm", kernels_built=True), "reference", False),
    ("cc7.5-built", _cuda(7.5), "reference", False),
    ("cc7.5-w4a4", _cuda(7.5, activation_format="nvfp4"), "reference", True),
    ("cc8.0-built", _cuda(8.0), "cuda", False),
    ("cc8.0-unbuilt", _cuda(8.0, built=False), "reference", False),
    ("cc8.6-built", _cuda(8.6), "cuda", False),
    ("cc8.9-built", _cuda(8.9), "cuda", False),
    ("cc8.9-w4a4", _cuda(8.9, activation_format="nvfp4"), "cuda", True),
    ("cc9.0-built", _cuda(9.0), "cuda", False),
    ("cc9.0-unbuilt", _cuda(9.0, built=False), "reference", False),
    ("cc9.0-w4a4", _cuda(9.0, activation_format="nvfp4"), "cuda", True),
    ("cc9.0-w4a4-unbuilt", _cuda(9.0, built=False, activation_format="nvfp4"), "reference",
     True),
    ("cc10.0-built", _cuda(10.0), "cuda", False),
    ("cc10.0-w4a4", _cuda(10.0, activation_format="nvfp4"), "cuda", True),
    ("cc9.0-explicit-cuda", _cuda(9.0, backend="cuda"), "cuda", False),
    ("cc9.0-explicit-reference", _cuda(9.0, backend="reference"), "reference", False),
    ("cc9.0-explicit-auto", _cuda(9.0, backend="auto"), "cuda", False),
    ("cpu-explicit-reference", dict(platform="cpu", backend="reference"), "reference", False),
    ("cc9.0-moe-swiglu", _cuda(9.0, moe_activation="swiglu", moe_kernel_built=True), "cuda",
     False),
    ("cc9.0-moe-swiglu-limit", _cuda(9.0, moe_activation="swiglu", limit=7.0,
                                     moe_kernel_built=True), "cuda", False),
    ("cc8.0-moe-gptoss", _cuda(8.0, moe_activation="gptoss", limit=7.0, moe_kernel_built=True),
     "cuda", False),
    ("cc8.9-moe-relu2", _cuda(8.9, moe_activation="relu2", moe_kernel_built=True), "cuda", False),
    ("cc9.0-moe-no-moe-kernel", _cuda(9.0, moe_activation="swiglu", moe_kernel_built=False),
     "reference", False),
    ("cc9.0-dense-no-moe-kernel", _cuda(9.0, moe_kernel_built=False), "cuda", False),
    ("cpu-moe-relu2", dict(platform="cpu", moe_activation="relu2"), "reference", False),
]


@pytest.mark.parametrize("kwargs,name,drops", [c[1:] for c in CHOICES],
                         ids=[c[0] for c in CHOICES])
def test_choice_table(kwargs, name, drops, caplog):
  with caplog.at_level(logging.WARNING, logger="jax_nvfp4"):
    choice = select_backend(weight_format="nvfp4", **kwargs)
  assert isinstance(choice, BackendChoice)
  assert (choice.name, choice.drops_activation_scales) == (name, drops)
  warnings = [r for r in caplog.records if r.name == "jax_nvfp4"]
  if drops:
    assert len(warnings) == 1 and "activation scales" in warnings[0].getMessage()
    assert "W4A4" in choice.reason
  else:
    # A weight-only checkpoint: never activation quantization, nothing to warn about.
    assert warnings == [] and "weight-only checkpoint" in choice.reason


def test_reasons_name_the_cause():
  assert "7.5" in select_backend(weight_format="nvfp4", **_cuda(7.5)).reason
  assert "built" in select_backend(weight_format="nvfp4", **_cuda(9.0, built=False)).reason
  assert "asked for" in select_backend(weight_format="nvfp4", **_cuda(9.0,
                                                                       backend="reference")).reason
  moe = select_backend(weight_format="nvfp4", **_cuda(9.0, moe_activation="swiglu",
                                                      moe_kernel_built=False))
  assert B.MOE_TARGET in moe.reason


def test_w4a4_message_depends_on_fp4_tensor_cores(caplog):
  with caplog.at_level(logging.WARNING, logger="jax_nvfp4"):
    select_backend(weight_format="nvfp4", activation_format="nvfp4", **_cuda(9.0))
    select_backend(weight_format="nvfp4", activation_format="nvfp4", **_cuda(10.0))
  old, new = [r.getMessage() for r in caplog.records]
  assert "has no FP4 tensor cores" in old and "9.0" in old
  assert "has FP4 tensor cores, but jax_nvfp4 has no W4A4 kernel" in new


def test_w4a4_warning_logged_once_per_process(caplog):
  with caplog.at_level(logging.WARNING, logger="jax_nvfp4"):
    for _ in range(3):
      assert select_backend(weight_format="nvfp4", activation_format="nvfp4",
                            **_cuda(8.6)).drops_activation_scales
  assert len(caplog.records) == 1
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="jax_nvfp4"):
    select_backend(weight_format="nvfp4", activation_format="nvfp4", **_cuda(8.6))
  assert caplog.records == []  # still the same process: not again
  B.reset_log_once()
  with caplog.at_level(logging.WARNING, logger="jax_nvfp4"):
    select_backend(weight_format="nvfp4", activation_format="nvfp4", **_cuda(8.6))
  assert len(caplog.records) == 1


@pytest.mark.parametrize("kwargs,needles", [
    (_cuda(7.5, backend="cuda"), ["cuda: needs compute capability >= 8.0", "7.5",
                                  "reference: available"]),
    (dict(platform="cpu", backend="cuda"), ["cuda: needs an NVIDIA GPU", "cpu",
                                            "reference: available"]),
    (_cuda(9.0, built=False, backend="cuda"), ["cuda: jax_nvfp4 was built without",
                                               "reference: available"]),
    (_cuda(9.0, backend="cuda", moe_activation="relu2", moe_kernel_built=False),
     ["cuda: the MoE grouped-GEMM kernel", "reference: available"]),
    (dict(platform="cuda", backend="cuda"), ["compute capability, which is unknown"]),
], ids=["cc7.5", "cpu", "unbuilt", "moe-kernel-missing", "cc-unknown"])
def test_explicit_backend_refused_lists_every_backend(kwargs, needles):
  with pytest.raises(ValueError, match="backend='cuda' cannot serve") as e:
    select_backend(weight_format="nvfp4", **kwargs)
  msg = str(e.value)
  for needle in needles:
    assert needle in msg
  assert "cuda:" in msg and "reference:" in msg


@pytest.mark.parametrize("fmt", ["fp8", "bf16", "fp16", "float32"])
@pytest.mark.parametrize("device", [_cuda(9.0), dict(platform="cpu")], ids=["cc9.0", "cpu"])
def test_non_nvfp4_weights_refused_with_every_reason(fmt, device):
  with pytest.raises(ValueError, match="no jax_nvfp4 backend can serve") as e:
    select_backend(weight_format=fmt, **device)
  msg = str(e.value)
  assert msg.count("serves NVFP4 weights only") == 2
  assert "cuda:" in msg and "reference:" in msg


def test_explicit_reference_with_fp8_refused():
  with pytest.raises(ValueError, match="backend='reference' cannot serve"):
    select_backend(weight_format="fp8", platform="cpu", backend="reference")


@pytest.mark.parametrize("cc", [8.6, "8.6", (8, 6)])
def test_compute_capability_spellings(cc):
  choice = select_backend(weight_format="nvfp4", **_cuda(cc))
  assert choice.name == "cuda" and "8.6" in choice.reason


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight_format="int4"), "weight_format"),
    (dict(weight_format="nvfp4", activation_format="fp8"), "activation_format"),
    (dict(weight_format="nvfp4", backend="triton"), "backend"),
    (dict(weight_format="nvfp4", platform="xpu"), "platform"),
    (dict(weight_format="nvfp4", platform="cuda", compute_capability="sm90"),
     "compute_capability"),
    (dict(weight_format="nvfp4", moe_activation="gelu"), "moe_activation"),
    (dict(weight_format="nvfp4", moe_activation="relu2", limit=7.0), "limit"),
    (dict(weight_format="nvfp4", moe_activation="swiglu", limit=-1.0), "positive"),
    (dict(weight_format="nvfp4", moe_activation="gptoss"), "needs a limit"),
    (dict(weight_format="nvfp4", limit=7.0), "limit"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    select_backend(**{"platform": "cpu", **kwargs})


def _fake_gpu(cc: str):
  client = types.SimpleNamespace(platform_version="cuda 12080")
  return [types.SimpleNamespace(platform="gpu", compute_capability=cc, client=client)]


def test_autodetect_this_machine():
  # This test machine: detected from jax.devices() and _ffi, no argument given.
  choice = select_backend(weight_format="nvfp4")
  platform = jax.devices()[0].platform
  expected = ("cuda" if platform == "gpu" and _ffi.cuda_kernels_built()
              and float(jax.devices()[0].compute_capability) >= 8.0 else "reference")
  assert choice.name == expected


def test_autodetect_fake_gpu(monkeypatch):
  monkeypatch.setattr(jax, "devices", lambda *a: _fake_gpu("9.0"))
  assert select_backend(weight_format="nvfp4", kernels_built=True).name == "cuda"
  assert select_backend(weight_format="nvfp4", kernels_built=False).name == "reference"
  # An explicit capability wins over the detected one.
  assert select_backend(weight_format="nvfp4", kernels_built=True,
                        compute_capability=7.5).name == "reference"
  monkeypatch.setattr(jax, "devices", lambda *a: _fake_gpu("7.5"))
  assert select_backend(weight_format="nvfp4", kernels_built=True).name == "reference"


def test_kernels_built_autodetect(monkeypatch):
  monkeypatch.setattr(_ffi, "cuda_kernels_built", lambda: True)
  monkeypatch.setattr(_ffi, "REGISTERED", frozenset({B.DENSE_TARGET}))
  assert select_backend(weight_format="nvfp4", **{**_cuda(9.0), "kernels_built": None}).name \
      == "cuda"
  # The dense target alone does not serve an MoE layer.
  assert select_backend(weight_format="nvfp4", moe_activation="swiglu",
                        **{**_cuda(9.0), "kernels_built": None}).name == "reference"
  monkeypatch.setattr(_ffi, "REGISTERED", frozenset({B.DENSE_TARGET, B.MOE_TARGET}))
  assert select_backend(weight_format="nvfp4", moe_activation="swiglu",
                        **{**_cuda(9.0), "kernels_built": None}).name == "cuda"
  monkeypatch.setattr(_ffi, "cuda_kernels_built", lambda: False)
  assert select_backend(weight_format="nvfp4", **{**_cuda(9.0), "kernels_built": None}).name \
      == "reference"


def test_a_cuda_build_registers_every_target_the_ops_lower_to():
  """A CUDA build holds every handler the Python side may lower to: an older build without one
  (a stale extension after a pull) would send that op to the reference path, or skip its GPU
  tests, without a word."""
  from jax_nvfp4.ops import dequantize, moe, moe_align, moe_pair, moe_route
  wanted = {B.DENSE_TARGET, dequantize.CUDA_TARGET, moe.CUDA_TARGET, moe_pair.CUDA_TARGET,
            moe_align.CUDA_TARGET, moe_route.CUDA_TARGET}
  assert set(B.cuda_targets()) == wanted  # what export_disabled_checks covers
  if not _ffi.cuda_kernels_built():
    assert _ffi.REGISTERED == frozenset()
    pytest.skip(f"no CUDA kernels in this build ({_ffi.why_no_kernels()})")
  assert wanted <= _ffi.REGISTERED, (f"the extension lacks {sorted(wanted - _ffi.REGISTERED)}: "
                                     "rebuild jax_nvfp4 (bash scripts/test.sh does)")
  assert _ffi.REGISTERED <= wanted, f"handlers no op lowers to: {sorted(_ffi.REGISTERED - wanted)}"


def test_a_cuda_build_names_its_architectures_and_its_loaded_code():
  """The build says what it holds (CMake's entries), and asking what the driver loaded answers
  on any machine: nothing loaded (arch 0, no overlapped launch, no cluster) without a GPU."""
  if not _ffi.cuda_kernels_built():
    assert _ffi.cuda_architectures() == () and _ffi.loaded_code(1) == {}
    pytest.skip(f"no CUDA kernels in this build ({_ffi.why_no_kernels()})")
  archs = _ffi.cuda_architectures()
  entry = r"[0-9]{2,3}[af]?(-real|-virtual)?|native|all|all-major"  # CMake's forms
  assert archs and all(re.fullmatch(entry, a) for a in archs), archs
  if not any(d.platform == "gpu" for d in jax.devices()):
    for moe in (False, True):
      assert _ffi.loaded_code(8, False, moe) == {"arch": 0, "pdl": False, "cluster_limit": 0}


def test_arch_the_driver_loads_by_hand():
  """The rule the launch-feature GPU test expects the driver to follow (tests/_cuda_arch.py)."""
  from tests._cuda_arch import arch_the_driver_loads
  assert arch_the_driver_loads(["80", "86", "89", "90a"], 90) == 90
  assert arch_the_driver_loads(["80", "86", "89", "90a"], 86) == 86
  assert arch_the_driver_loads(["80", "86", "89", "90a"], 87) == 86
  assert arch_the_driver_loads(["80", "86", "89", "90a"], 100) == 89  # PTX, compiled by the driver
  assert arch_the_driver_loads(["80-virtual"], 90) == 80
  assert arch_the_driver_loads(["80"], 90) == 80
  assert arch_the_driver_loads(["80-real"], 90) == 0

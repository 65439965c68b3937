"""Loads jax_nvfp4._C and registers its XLA FFI targets with JAX (once, at import)."""

from __future__ import annotations

import jax

try:
  from jax_nvfp4 import _C
except ImportError as e:  # a source checkout that was never built: the reference path still works
  _C = None
  _IMPORT_ERROR = e
else:
  _IMPORT_ERROR = None

REGISTERED: frozenset[str] = frozenset()
if _C is not None:
  for _name, _capsule in _C.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")
  REGISTERED = frozenset(_C.registrations())


def cuda_kernels_built() -> bool:
  """True when the CUDA kernels were compiled into this installation."""
  return _C is not None and bool(_C.built_with_cuda())


def why_no_kernels() -> str:
  if _C is None:
    return f"the extension jax_nvfp4._C is not built ({_IMPORT_ERROR})"
  if not _C.built_with_cuda():
    return "jax_nvfp4 was built without a CUDA toolkit (nvcc not found at build time)"
  return ""


def sm_count() -> int:
  """Multiprocessors of the current CUDA device, 0 when unknown."""
  return int(_C.sm_count()) if cuda_kernels_built() else 0


def blocks_per_sm(m_tile: int, bf16: bool, k_slices: int = 1, rows: int = 0) -> int:
  """Resident blocks per SM of the dense kernel, 0 when unknown or when the launch does not
  fit an SM of this device. ``rows``: the launch's M, which picks the x tile of the k-sliced
  m_tile-1 block (1, 2 or 4 rows at M <= 4, a ring of another depth; 0: the 8-row tile)."""
  return int(_C.blocks_per_sm(m_tile, bf16, k_slices, rows)) if cuda_kernels_built() else 0


def moe_blocks_per_sm(m_tile: int, bf16: bool, k_slices: int = 1, rows: int = 0) -> int:
  """Resident blocks per SM of the grouped MoE kernel, 0 when unknown or when the launch does
  not fit an SM of this device. ``rows``: the launch's ``expert_rows`` hint (0: none)."""
  return (int(_C.moe_blocks_per_sm(m_tile, bf16, k_slices, rows)) if cuda_kernels_built()
          else 0)


def cluster_limit(m_tile: int, bf16: bool, moe: bool) -> int:
  """Largest K split the kernels reduce inside a thread-block cluster (sm_90) for token tile
  ``m_tile``; 0 when the device or the build has no cluster path (split K then reduces through
  a global workspace)."""
  return int(_C.cluster_limit(m_tile, bf16, moe)) if cuda_kernels_built() else 0


def smem_limit() -> int:
  """Bytes of shared memory one block may have on the current CUDA device (lowered by
  ``JAX_NVFP4_SMEM_LIMIT_KB``), 0 when unknown."""
  return int(_C.smem_limit()) if cuda_kernels_built() else 0


def cuda_architectures() -> tuple[str, ...]:
  """The CUDA architectures the kernels were built for, as CMake's CUDA_ARCHITECTURES entries
  (``"90a"``: its SASS and PTX, ``"80-virtual"``: PTX only); empty without the kernels."""
  if not cuda_kernels_built():
    return ()
  return tuple(a for a in str(_C.cuda_architectures()).split(",") if a)


def loaded_code(m_tile: int, bf16: bool = True, moe: bool = False) -> dict:
  """What the driver loaded for the kernel of token tile ``m_tile`` on the current device:
  ``arch``, the architecture its code was compiled for (90 for sm_90a; 80 where the driver
  compiled sm_80 PTX for a newer GPU; 0 unknown), ``pdl`` (its launches may overlap the previous
  kernel: needs sm_90 code) and ``cluster_limit`` (0 without sm_90 code). Empty without the
  kernels."""
  if not cuda_kernels_built():
    return {}
  return dict(_C.loaded_code(m_tile, bf16, moe))

"""``python -m jax_nvfp4 env``: what runs on this machine and why.

Versions, the default device, what the extension was built for, the backend ``select_backend``
picks for a dense and an MoE layer, the ``JAX_NVFP4_*`` variables set, and on a CUDA GPU with
the kernels the facts the launches are chosen from: the architecture of the code the driver
loaded (its own SASS, or older PTX it compiled), whether launches overlap (programmatic
dependent launch) and reduce split K in clusters, the SM count, the shared memory a block may
have and how many blocks of each token tile fit an SM.
"""

from __future__ import annotations

import os
import platform

import jax


def _code_line(code: dict, device_arch: int | None) -> str:
  arch = code.get("arch", 0)
  if not arch:
    what = "unknown"
  elif device_arch is not None and arch < device_arch:
    what = f"sm_{arch} PTX compiled by the driver for this GPU"
  else:
    what = f"sm_{arch}"
  return (f"loaded kernel code: {what}; overlapped launches (PDL) "
          f"{'on' if code.get('pdl') else 'off'}; split-K clusters "
          + (f"up to {code['cluster_limit']} blocks" if code.get("cluster_limit") else "off"))


def lines() -> list[str]:
  """The report, one string per line."""
  import jaxlib  # pylint: disable=import-outside-toplevel
  from jax_nvfp4 import __version__, _ffi, backend  # pylint: disable=import-outside-toplevel
  from jax_nvfp4.ops import dense  # pylint: disable=import-outside-toplevel
  out = [f"jax_nvfp4 {__version__}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
         f"Python {platform.python_version()}"]
  devices = jax.devices()
  dev = devices[0]
  cc = getattr(dev, "compute_capability", None)
  out.append(f"device: {dev.platform} {dev.device_kind}"
             + (f", compute capability {cc}" if cc else "") + f" ({len(devices)} in all)")
  if _ffi.cuda_kernels_built():
    out.append(f"kernels: built for {', '.join(_ffi.cuda_architectures())}; "
               f"{len(_ffi.REGISTERED)} FFI targets registered")
  else:
    out.append(f"kernels: not built ({_ffi.why_no_kernels()})")
  for what, kw in (("dense", {}), ("MoE", {"moe_activation": "swiglu"})):
    try:
      choice = backend.select_backend(weight_format="nvfp4", **kw)
      out.append(f"backend ({what}): {choice.name}: {choice.reason}")
    except ValueError as e:
      out.append(f"backend ({what}): none: {e}")
  knobs = sorted(k for k in os.environ if k.startswith("JAX_NVFP4_"))
  out.append("environment: " + (", ".join(f"{k}={os.environ[k]}" for k in knobs) or "no "
                                "JAX_NVFP4_* variable set"))
  if not (_ffi.cuda_kernels_built() and _ffi.sm_count()):
    return out
  major_minor = backend._parse_cc(cc)  # pylint: disable=protected-access
  device_arch = None if major_minor is None else major_minor[0] * 10 + major_minor[1]
  out.append(_code_line(_ffi.loaded_code(1), device_arch))
  out.append(f"SMs: {_ffi.sm_count()}; shared memory per block: {_ffi.smem_limit() // 1024} KB")
  for moe in (False, True):
    query = _ffi.moe_blocks_per_sm if moe else _ffi.blocks_per_sm
    per_tile = ", ".join(f"{8 * mt} rows {query(mt, True)}" for mt in (1, 2, 4, 8))
    out.append(f"{'grouped' if moe else 'dense'} GEMM blocks per SM by token tile: {per_tile}")
  dense_rows, moe_rows = 8 * dense.fitting_m_tile(8), 8 * dense.fitting_m_tile(8, moe=True)
  if min(dense_rows, moe_rows) < 64:
    out.append(f"tiles of up to {dense_rows} rows fit here (the dense GEMM runs larger M in "
               f"those), fused_moe takes block_m <= {moe_rows}")
  return out


def main() -> int:
  print("\n".join(lines()))
  return 0

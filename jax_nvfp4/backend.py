"""The backend oracle: which jax_nvfp4 backend runs an NVFP4 layer on this machine, and how.

``select_backend`` decides from the checkpoint kind (weight format, activation format), the device
(platform and CUDA compute capability, auto-detected from ``jax.devices()``), whether the CUDA
kernels are built, and, for MoE layers, the expert activation. Backends, in order of preference:

* ``"cuda"``: our CUDA kernels (``csrc/``) through XLA FFI custom calls. Needs NVFP4 weights, an
  NVIDIA GPU with compute capability >= 8.0 (bf16 ``mma.sync`` and ``cp.async``) and a build of
  jax_nvfp4 with the CUDA kernels (the MoE grouped-GEMM kernel too, for an MoE layer).
* ``"reference"``: pure JAX (dequantize, then an XLA dot). Runs NVFP4 weights on any platform;
  on a GPU it writes the dequantized weight to memory first, so it is slow there.

Both backends are **weight-only** (W4A16): activations stay bf16/fp16, nothing quantizes them.
Hence the activation rules:

* A W4A16 checkpoint (``activation_format=None``) is never run with activation quantization.
* A W4A4 checkpoint (``activation_format="nvfp4"``, it carries activation ``input_scale``\\ s) runs
  as W4A16 with its activation scales dropped. On a GPU without FP4 tensor cores (compute
  capability < 10.0), on the CPU and elsewhere that is the only way to run it; on a GPU with FP4
  tensor cores (>= 10.0) a native W4A4 engine could do better, but jax_nvfp4 has none. Weight-only
  is the more accurate of the two (bf16 activations instead of FP4 ones). Either way the choice
  says so (``drops_activation_scales=True``) and a ``logging.warning`` on the ``"jax_nvfp4"``
  logger says so once per process (per distinct message), so that it is never an accident.

A backend asked for explicitly (``backend="cuda"``) that cannot serve the configuration raises a
``ValueError`` that lists every backend with the reason it was rejected; so does auto selection
when no backend can serve it (e.g. FP8 or bf16 weights, which are not NVFP4).
"""

from __future__ import annotations

import dataclasses
import logging

import jax

from jax_nvfp4 import _ffi
from jax_nvfp4.moe import activations as moe_activations
from jax_nvfp4.ops import dequantize as dequantize_ops
from jax_nvfp4.ops import moe as moe_ops
from jax_nvfp4.ops import moe_align, moe_pair, moe_route

logger = logging.getLogger("jax_nvfp4")

#: All backends, in order of preference for auto selection.
BACKENDS = ("cuda", "reference")
#: Weight formats the oracle knows. Only "nvfp4" is served; the others get a clear refusal.
WEIGHT_FORMATS = ("nvfp4", "fp8", "bf16", "fp16", "float32")
#: Activation formats: None = unquantized activations (W4A16), "nvfp4" = W4A4 checkpoint.
ACTIVATION_FORMATS = (None, "nvfp4")
#: MoE expert activations (``jax_nvfp4.ops.moe.fused_moe``'s ``activation`` argument).
MOE_ACTIVATIONS = tuple(moe_activations.ACTIVATIONS)
#: MoE activations that take a clamp ``limit`` (required by "gptoss").
MOE_LIMIT_ACTIVATIONS = tuple(a for a in MOE_ACTIVATIONS if moe_activations.is_gated(a))

MIN_CUDA_CC = (8, 0)
FP4_TENSOR_CORE_CC = (10, 0)
#: FFI targets the "cuda" backend needs: the dense GEMM, plus the grouped GEMM for an MoE layer.
DENSE_TARGET = "jax_nvfp4_gemm_cuda"
MOE_TARGET = moe_ops.CUDA_TARGET


def cuda_targets() -> tuple[str, ...]:
  """Every XLA FFI target the ops may lower to on the cuda platform (one handler each in
  ``jax_nvfp4._C``): the dense GEMM, the dequantizer, the grouped GEMM, the grouped-GEMM pair,
  the token alignment and the fused routing + alignment."""
  return (DENSE_TARGET, dequantize_ops.CUDA_TARGET, MOE_TARGET, moe_pair.CUDA_TARGET,
          moe_align.CUDA_TARGET, moe_route.CUDA_TARGET)


def export_disabled_checks() -> list:
  """``disabled_checks`` for ``jax.export.export`` of a computation that calls the kernels.

  ``jax.export`` refuses custom calls without JAX's compatibility guarantee, and ours have none:
  the serialized module names ``cuda_targets()`` and passes them their launch attributes, which
  may change between versions of jax_nvfp4. Load such an artifact in a process that imported
  the same version of jax_nvfp4 built with its CUDA kernels (importing registers the handlers).
  The launches (token tiles, K splits, clusters) are chosen when exporting, for the exporting
  host's GPU (an H100's where it has none): export on the kind of GPU that will run it (an
  artifact for an H100 cannot launch its 16-64-row blocks on an A10 or L4, and says so at its
  first call). Exporting for ``platforms=("cpu", "cuda")`` keeps the pure-JAX reference for the
  CPU.

  Returns a list of ``jax.export.DisabledSafetyCheck``, one per target.
  """
  from jax import export  # pylint: disable=import-outside-toplevel
  return [export.DisabledSafetyCheck.custom_call(t) for t in cuda_targets()]


_PLATFORM_ALIASES = {"gpu": "cuda", "cuda": "cuda", "rocm": "rocm", "cpu": "cpu", "tpu": "tpu",
                     "metal": "metal"}


@dataclasses.dataclass(frozen=True)
class BackendChoice:
  """The oracle's answer.

  Attributes:
    name: ``"cuda"`` or ``"reference"``.
    reason: one line saying why (and what the layer will do), for logs and reprs.
    drops_activation_scales: True when the checkpoint is W4A4 and runs weight-only, its activation
      scales ignored on purpose.
  """

  name: str
  reason: str
  drops_activation_scales: bool = False


# ----------------------------------------------------------------------------- device facts

def _parse_cc(cc) -> tuple[int, int] | None:
  """Compute capability from ``8.6``, ``"8.6"``, ``(8, 6)`` or None."""
  if cc is None:
    return None
  if isinstance(cc, tuple) and len(cc) == 2 and all(isinstance(v, int) for v in cc):
    return cc
  if isinstance(cc, (int, float, str)) and not isinstance(cc, bool):
    text = str(cc).strip()
    major, _, minor = text.partition(".")
    if major.isdigit() and (minor.isdigit() or minor == ""):
      return int(major), int(minor or 0)
  raise ValueError(f"select_backend: compute_capability must look like 8.6, '8.6' or (8, 6), "
                   f"got {cc!r}")


def _detect_device() -> tuple[str, tuple[int, int] | None]:
  """(platform, compute capability) of the default JAX device."""
  dev = jax.devices()[0]
  platform = dev.platform.lower()
  cc = getattr(dev, "compute_capability", None)
  if platform == "gpu":
    version = str(getattr(dev.client, "platform_version", "")).lower()
    platform = "rocm" if ("rocm" in version or "hip" in version) and cc is None else "cuda"
  return platform, (_parse_cc(cc) if platform == "cuda" and cc is not None else None)


def _fmt_cc(cc: tuple[int, int] | None) -> str:
  return "unknown" if cc is None else f"{cc[0]}.{cc[1]}"


# ----------------------------------------------------------------------------- log once

_LOGGED: set[str] = set()


def _warn_once(message: str) -> None:
  if message not in _LOGGED:
    _LOGGED.add(message)
    logger.warning(message)


def reset_log_once() -> None:
  """Forgets which warnings were logged (for tests)."""
  _LOGGED.clear()


# ----------------------------------------------------------------------------- the oracle

def _why_not(name: str, *, weight_format: str, platform: str, cc, kernels_built: bool,
             moe: bool, moe_kernel: bool) -> str | None:
  """None if backend ``name`` can serve the configuration, else the reason it cannot."""
  if weight_format != "nvfp4":
    kind = "FP8 weights" if weight_format == "fp8" else f"unquantized {weight_format} weights"
    return (f"serves NVFP4 weights only, got {kind} (jax_nvfp4 has no op for them; run such "
            "layers with plain JAX/Flax, e.g. nnx.Linear)")
  if name == "reference":
    return None
  # name == "cuda"
  if platform != "cuda":
    return f"needs an NVIDIA GPU (CUDA), the device platform is {platform}"
  if cc is None:
    return "needs the GPU's compute capability, which is unknown"
  if cc < MIN_CUDA_CC:
    return (f"needs compute capability >= {_fmt_cc(MIN_CUDA_CC)} (bf16 mma.sync, cp.async), "
            f"this GPU has {_fmt_cc(cc)}")
  if not kernels_built:
    return "jax_nvfp4 was built without its CUDA kernels (" + (_ffi.why_no_kernels() or
                                                                "not built") + ")"
  if moe and not moe_kernel:
    return f"the MoE grouped-GEMM kernel ({MOE_TARGET}) is not in this build"
  return None


def select_backend(*, weight_format: str, activation_format: str | None = None,
                   platform: str | None = None, compute_capability=None,
                   moe_activation: str | None = None, limit: float | None = None,
                   backend: str | None = None, kernels_built: bool | None = None,
                   moe_kernel_built: bool | None = None) -> BackendChoice:
  """Chooses the backend that runs an NVFP4 layer (see the module docstring for the rules).

  Args:
    weight_format: the checkpoint's weight format: ``"nvfp4"`` (served), ``"fp8"``, ``"bf16"``,
      ``"fp16"``, ``"float32"`` (known, never served: refused with the reasons).
    activation_format: None for a weight-only (W4A16) checkpoint, ``"nvfp4"`` for a W4A4
      checkpoint that carries activation scales (they are dropped, with a warning once).
    platform: ``"cuda"`` (alias ``"gpu"``), ``"cpu"``, ``"rocm"``, ``"tpu"``...; None detects it
      from ``jax.devices()[0]``.
    compute_capability: CUDA compute capability (``8.6``, ``"8.6"``, ``(8, 6)``); None detects it
      (when the platform is detected too; for an explicit ``"cuda"`` platform None means unknown).
    moe_activation: for an MoE layer, its expert activation (one of ``MOE_ACTIVATIONS``); None
      for a dense layer. An MoE layer on the "cuda" backend also needs the grouped-GEMM kernel.
    limit: the MoE activation clamp, positive: optional for ``swiglu``, required for
      ``gptoss``, refused for ``relu2``.
    backend: None or ``"auto"`` to choose; ``"cuda"`` or ``"reference"`` to insist (a
      ``ValueError`` when it cannot serve the configuration).
    kernels_built: whether the CUDA kernels are built; None asks ``_ffi.cuda_kernels_built()``.
    moe_kernel_built: whether the MoE grouped-GEMM FFI target is registered; None asks
      ``_ffi.REGISTERED`` (it is only consulted for an MoE layer).

  Returns:
    A ``BackendChoice``. Raises ``ValueError`` for unknown argument values and when no backend
    (or not the one asked for) can serve the configuration, listing every backend and why.
  """
  if weight_format not in WEIGHT_FORMATS:
    raise ValueError(f"select_backend: weight_format must be one of {WEIGHT_FORMATS}, "
                     f"got {weight_format!r}")
  if activation_format in ("none", "bf16", "fp16"):
    activation_format = None  # unquantized activations, spelled out
  if activation_format not in ACTIVATION_FORMATS:
    raise ValueError(f"select_backend: activation_format must be None (W4A16) or 'nvfp4' (W4A4), "
                     f"got {activation_format!r}")
  if backend in (None, "auto"):
    backend = None
  elif backend not in BACKENDS:
    raise ValueError(f"select_backend: backend must be 'auto' or one of {BACKENDS}, got "
                     f"{backend!r}")
  if moe_activation is not None and moe_activation not in MOE_ACTIVATIONS:
    raise ValueError(f"select_backend: moe_activation must be None (dense layer) or one of "
                     f"{MOE_ACTIVATIONS}, got {moe_activation!r}")
  if limit is not None:
    if moe_activation not in MOE_LIMIT_ACTIVATIONS:
      raise ValueError(f"select_backend: limit (a clamp) applies to the MoE activations "
                       f"{MOE_LIMIT_ACTIVATIONS} only, got moe_activation={moe_activation!r}")
    if not float(limit) > 0:
      raise ValueError(f"select_backend: limit must be positive, got {limit!r}")
  elif moe_activation == "gptoss":
    raise ValueError("select_backend: moe_activation 'gptoss' needs a limit (gpt-oss uses 7.0)")

  cc = _parse_cc(compute_capability)
  if platform is None:
    platform, detected_cc = _detect_device()
    cc = cc if cc is not None else detected_cc
  else:
    if not isinstance(platform, str) or platform.lower() not in _PLATFORM_ALIASES:
      raise ValueError(f"select_backend: platform must be one of "
                       f"{sorted(set(_PLATFORM_ALIASES))} or None, got {platform!r}")
    platform = _PLATFORM_ALIASES[platform.lower()]
  if platform != "cuda":
    cc = None
  if kernels_built is None:
    kernels_built = _ffi.cuda_kernels_built() and DENSE_TARGET in _ffi.REGISTERED
  moe = moe_activation is not None
  if moe_kernel_built is None:
    moe_kernel_built = MOE_TARGET in _ffi.REGISTERED

  reasons = {name: _why_not(name, weight_format=weight_format, platform=platform, cc=cc,
                            kernels_built=bool(kernels_built), moe=moe,
                            moe_kernel=bool(moe_kernel_built))
             for name in BACKENDS}
  candidates = [backend] if backend is not None else list(BACKENDS)
  chosen = next((name for name in candidates if reasons[name] is None), None)
  if chosen is None:
    what = (f"weight_format={weight_format!r}, activation_format={activation_format!r}, "
            f"platform={platform!r}, compute_capability={_fmt_cc(cc)}, "
            f"kernels_built={bool(kernels_built)}"
            + (f", moe_activation={moe_activation!r}" if moe else ""))
    listing = "; ".join(f"{name}: " + (reasons[name] or "available (not asked for)")
                        for name in BACKENDS)
    head = (f"backend={backend!r} cannot serve" if backend is not None
            else "no jax_nvfp4 backend can serve")
    raise ValueError(f"select_backend: {head} {what}. Backends: {listing}")

  layer = f"MoE ({moe_activation}) layer" if moe else "layer"
  if chosen == "cuda":
    reason = (f"NVFP4 {layer} on CUDA compute capability {_fmt_cc(cc)}: jax_nvfp4 CUDA kernels "
              "(W4A16)")
  else:
    why = ("asked for" if backend == "reference"
           else "cuda unavailable: " + reasons["cuda"])
    reason = f"NVFP4 {layer} on {platform}: pure-JAX reference ({why})"

  drops = activation_format == "nvfp4"
  if drops:
    if platform == "cuda" and cc is not None and cc >= FP4_TENSOR_CORE_CC:
      why_w4a16 = (f"this GPU (compute capability {_fmt_cc(cc)}) has FP4 tensor cores, but "
                   "jax_nvfp4 has no W4A4 kernel")
    elif platform == "cuda":
      why_w4a16 = (f"this GPU (compute capability {_fmt_cc(cc)}) has no FP4 tensor cores")
    else:
      why_w4a16 = f"the {platform} platform has no FP4 arithmetic"
    _warn_once(f"jax_nvfp4: W4A4 NVFP4 checkpoint runs as W4A16 (weight-only) on the {chosen} "
               f"backend: {why_w4a16}; its activation scales (input_scale) are dropped and "
               "activations stay bf16/fp16.")
    reason += "; W4A4 checkpoint run weight-only, activation scales dropped"
  else:
    reason += "; weight-only checkpoint, activations unquantized"
  return BackendChoice(chosen, reason, drops)

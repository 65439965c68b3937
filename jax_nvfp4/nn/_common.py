"""Helpers shared by the NNX and Linen layers: dtype rule, weight layout, matmul dispatch."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jax_nvfp4 import backend as backend_lib
from jax_nvfp4.format import BLOCK_SIZE, NVFP4Weight, dequantize
from jax_nvfp4.ops import dense
from jax_nvfp4.prepare import GATE_UP_PAIR_ROWS, PreparedNVFP4Weight, prepare, unprepare
from jax_nvfp4.reference import reference_matmul

COMPUTE_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float16))

#: Names of the arrays of each weight layout, as stored in the layers' variables.
CHECKPOINT_FIELDS = ("packed", "scales", "global_scale")
PREPARED_FIELDS = ("qweight", "qscales", "global_scale")


def choose_backend(backend, activation_format, who: str, moe_activation=None, limit=None):
  """The oracle's choice for an NVFP4 layer; its ValueError is prefixed with the layer name."""
  try:
    return backend_lib.select_backend(weight_format="nvfp4", activation_format=activation_format,
                                      backend=backend, moe_activation=moe_activation,
                                      limit=limit)
  except ValueError as e:
    raise ValueError(f"{who}: {e}") from None


def moe_call_backend(requested, choice) -> str:
  """The ``backend`` an MoE layer hands ``fused_moe``: "auto" where the user asked for "auto"
  and the oracle chose the kernel, so the call still lowers per platform (the reference for a
  computation placed on the host of a GPU machine); otherwise the choice itself."""
  return "auto" if requested in (None, "auto") and choice.name == "cuda" else choice.name


def check_compute_dtype(dtype, who: str):
  """``dtype`` must be None, bfloat16 or float16; returns it as a NumPy dtype (or None)."""
  if dtype is None:
    return None
  d = np.dtype(dtype)
  if d not in COMPUTE_DTYPES:
    raise ValueError(f"{who}: dtype must be None, bfloat16 or float16 (the NVFP4 ops take "
                     f"16-bit activations), got {d}. With dtype=None, float32 inputs are "
                     "computed in bfloat16 and the result is returned as float32.")
  return d


def activation_dtypes(x: jax.Array, dtype, who: str):
  """(compute dtype, output dtype) for input ``x`` under the layers' documented rule.

  * ``dtype`` set (bf16/fp16): ``x`` is cast to it and the output is in it.
  * ``dtype=None``: bf16/fp16 inputs are computed and returned in their own dtype; any other
    floating input (float32, float64) is computed in bfloat16 (float32 accumulation inside the
    op) and the output is cast back to the input's dtype, so a float32 model keeps float32
    activations between layers.
  """
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{who}: inputs must be floating, got {x.dtype}")
  if dtype is not None:
    return dtype, dtype
  d = np.dtype(x.dtype)
  return (d, d) if d in COMPUTE_DTYPES else (np.dtype(jnp.bfloat16), d)


def check_correction_bias(bias, e_global: int, who: str) -> None:
  """An MoE layer's score-correction bias must be ``[E_global]`` (one per global expert)."""
  shape = tuple(getattr(bias, "shape", np.shape(bias)))
  if shape != (e_global,):
    raise ValueError(f"{who}: the correction bias must have shape (E_global,) = ({e_global},) "
                     f"(one entry per global expert), got shape {shape}")


def check_in_features(in_features: int, who: str) -> None:
  if not isinstance(in_features, (int, np.integer)) or in_features <= 0:
    raise ValueError(f"{who}: in_features must be a positive int, got {in_features!r}")
  if in_features % BLOCK_SIZE:
    raise ValueError(f"{who}: in_features = {in_features} must be a multiple of {BLOCK_SIZE} "
                     "(one FP8 block scale per 16 inputs)")


def resolve_prepare(prepare_arg, choice: backend_lib.BackendChoice, who: str) -> bool:
  """``prepare="auto"``: the kernel layout iff the chosen backend is "cuda"."""
  if prepare_arg == "auto":
    return choice.name == "cuda"
  if isinstance(prepare_arg, bool):
    return prepare_arg
  raise ValueError(f"{who}: prepare must be 'auto', True or False, got {prepare_arg!r}")


def to_layout(w, prepared: bool, gate_up_pairs: bool = False):
  """Converts an ``NVFP4Weight``/``PreparedNVFP4Weight`` to the wanted layout (exact): the
  kernel layout or not and, for a gated MoE w13, its rows in ``gate_up_pairs`` order (kernel
  layout only) or ``[gate; up]``."""
  if isinstance(w, PreparedNVFP4Weight) and w.gate_up_pairs != gate_up_pairs:
    w = unprepare(w)  # the other row order: back through [gate; up]
  if gate_up_pairs:
    return w if isinstance(w, PreparedNVFP4Weight) else prepare(w, gate_up_pairs=True)
  if prepared:
    return w if isinstance(w, PreparedNVFP4Weight) else prepare(w)
  return unprepare(w) if isinstance(w, PreparedNVFP4Weight) else w


def gate_up_pairs_row_blockers(intermediate_size: int, gate_up_shards: int) -> list[str]:
  """Why w13's ``2I`` rows, split over ``gate_up_shards`` tensor shards, cannot be stored in
  ``gate_up_pairs`` order (empty: they can). Each 16-row tile holds 8 gate rows and the
  matching 8 up rows, so I must be a multiple of 8, and each shard must hold whole tiles
  (I/tp a multiple of 8; a split tile would part gate rows from their up rows)."""
  if intermediate_size % GATE_UP_PAIR_ROWS:
    return [f"I = {intermediate_size} is not a multiple of {GATE_UP_PAIR_ROWS}"]
  if intermediate_size % (GATE_UP_PAIR_ROWS * gate_up_shards):
    return [f"w13's rows are split over a tensor axis of size {gate_up_shards} and I = "
            f"{intermediate_size} is not a multiple of {GATE_UP_PAIR_ROWS * gate_up_shards}: "
            "a shard would hold part of a 16-row gate/up tile"]
  return []


def gate_up_pairs_blockers(*, prepared: bool, activation: str, intermediate_size: int,
                           gate_up_shards: int) -> list[str]:
  """Why an MoE layer's w13 cannot be stored in ``gate_up_pairs`` order (empty: it can).

  An expert axis never blocks it (experts are split, rows are not), nor does a tensor split
  into whole 16-row tiles: shard t's tiles are then exactly its gate rows and their up rows in
  pairs order, and only the w13 bias is stored per shard (``parallel.gate_up_per_shard``)."""
  from jax_nvfp4.moe.activations import is_gated
  reasons = []
  if not prepared:
    reasons.append("the weights are kept in the checkpoint layout (prepare resolved to False), "
                   "and the pairs order is one of the kernel layout")
  if not is_gated(activation):
    reasons.append(f"activation {activation!r} is not gated")
  return reasons + gate_up_pairs_row_blockers(intermediate_size, gate_up_shards)


def check_fuse_activation(fuse_activation, who: str) -> None:
  if fuse_activation is not None and not isinstance(fuse_activation, bool):
    raise ValueError(f"{who}: fuse_activation must be None, True or False, got "
                     f"{fuse_activation!r}")


def resolve_fuse_activation(fuse_activation, *, prepared: bool, activation: str,
                            intermediate_size: int, gate_up_shards: int, who: str) -> bool:
  """Whether an MoE layer stores w13 in ``gate_up_pairs`` order, so that ``fused_moe`` applies
  the activation in GEMM 1's epilogue. None: exactly where that order is correct
  (``gate_up_pairs_blockers``); False: never; True: there, else a ``ValueError`` with the
  reasons."""
  check_fuse_activation(fuse_activation, who)
  reasons = gate_up_pairs_blockers(prepared=prepared, activation=activation,
                                   intermediate_size=intermediate_size,
                                   gate_up_shards=gate_up_shards)
  if fuse_activation and reasons:
    raise ValueError(f"{who}: fuse_activation=True needs w13 stored in gate_up_pairs order, "
                     f"which this layer cannot use: {'; '.join(reasons)}")
  return fuse_activation is not False and not reasons


def weight_arrays(w) -> tuple[jax.Array, jax.Array, jax.Array]:
  if isinstance(w, PreparedNVFP4Weight):
    return w.qweight, w.qscales, w.global_scale
  return w.packed, w.scales, w.global_scale


def weight_from_arrays(arrays, *, prepared: bool, n: int, k: int, dtype,
                       gate_up_pairs: bool = False):
  a, b, gs = arrays
  if prepared:
    return PreparedNVFP4Weight(a, b, gs, n=n, k=k, dtype=dtype, gate_up_pairs=gate_up_pairs)
  return NVFP4Weight(a, b, gs, dtype=dtype)


def weight_nbytes(n: int, k: int, prepared: bool) -> int:
  """Bytes of an [N, K] NVFP4 weight in either layout (the prepared one pads N to 16, K to 64)."""
  if prepared:
    n16, k64 = -(-n // 16), -(-k // 64)
    return n16 * k64 * 32 * 4 * 4 + n16 * k64 * 64 + 4
  return n * k // 2 + n * k // BLOCK_SIZE + 4


def sharding_specs(kernel_sharding, prepared: bool, who: str):
  """Per-array ``out_sharding`` tuples for a weight annotated along its logical [N, K] dims.

  The packed codes and block scales keep N and K as their first two dims (K halved or divided
  by 16; in the prepared layout N and K become 16-row tiles and 64-column chunks), so the [N, K]
  names carry over; the global scale is a replicated scalar.
  """
  if kernel_sharding is None:
    return None, None, None
  ks = tuple(kernel_sharding)
  if len(ks) != 2 or not all(a is None or isinstance(a, (str, tuple)) for a in ks):
    raise ValueError(f"{who}: kernel_sharding must name the mesh axes of the weight's [N, K] "
                     f"= [out, in] dims, e.g. ('model', None), got {kernel_sharding!r}")
  if prepared:
    return (*ks, None, None), (*ks, None), None
  return ks, ks, None


def _forward(x, w, bias, backend_name: str):
  # The reference backend must never reach the CUDA kernel (it is chosen exactly when the kernel
  # cannot run, e.g. on a GPU older than SM80), so where nvfp4_matmul would pick the kernel it
  # goes to reference_matmul instead: the same numbers as nvfp4_matmul's CPU lowering.
  if backend_name == "reference" and dense._kernel_wanted():
    w = unprepare(w) if isinstance(w, PreparedNVFP4Weight) else w
    return reference_matmul(x, w, bias)
  return dense.nvfp4_matmul(x, w, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _matmul(x, w, bias, backend_name):
  return _forward(x, w, bias, backend_name)


def _matmul_fwd(x, w, bias, backend_name):
  return _forward(x, w, bias, backend_name), (x, w, bias)


def _explicit_sharding(v):
  """``v``'s sharding where its type carries one (a mesh with Explicit axes in context, as
  ``jax.make_mesh`` makes by default), else None."""
  sharding = jax.typeof(v).sharding
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or not getattr(mesh, "explicit_axes", ()):
    return None
  return sharding


def _like(v, ref):
  """``v`` resharded to ``ref``'s Explicit sharding (as it is without one). A custom_vjp bwd
  rule must return cotangents of exactly its primal inputs' types, sharding included, and the
  products below come out sharded like the weight or the output instead."""
  sharding = _explicit_sharding(ref)
  return v if sharding is None else jax.sharding.reshard(v, sharding)


def _matmul_bwd(backend_name, res, g):
  x, w, bias = res
  checkpoint = unprepare(w) if isinstance(w, PreparedNVFP4Weight) else w
  w16 = dequantize(checkpoint, x.dtype)
  # out_sharding: under Explicit axes the contraction over a sharded N has no inferable result
  # sharding; dx takes x's.
  dx = jnp.einsum("...n,nk->...k", g.astype(x.dtype), w16, preferred_element_type=jnp.float32,
                  out_sharding=_explicit_sharding(x))
  dx = _like(dx.astype(x.dtype), x)
  dbias = None
  if bias is not None:
    g2 = g.astype(jnp.float32).reshape(-1, g.shape[-1])
    dbias = _like(jnp.sum(g2, axis=0).astype(bias.dtype), bias)
  return dx, None, dbias  # the NVFP4 weight is frozen: no cotangent


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def matmul(x: jax.Array, w, bias, backend_name: str) -> jax.Array:
  """``x @ W.T + bias`` through ``jax_nvfp4.nvfp4_matmul``, differentiable in ``x`` and ``bias``.

  The NVFP4 weight is frozen (no gradient; it is not a parameter). The backward pass is
  ``dx = g @ dequantize(W)`` in ``x.dtype`` with float32 accumulation and ``dbias = sum(g)``.
  (The primitive has no differentiation rule of its own, hence the custom VJP here.)
  """
  return _matmul(x, w, bias, backend_name)

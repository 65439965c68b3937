"""Routing and token alignment as one primitive, ``moe_route_align_p``: a single CUDA launch for a
decode-sized batch on GPUs, ``route`` followed by the alignment everywhere else.

Reading order: contract -> checks and abstract eval -> reference lowering -> CUDA lowering ->
batching -> wrapper. ``jax_nvfp4.route_and_align`` is the public entry point; ``fused_moe`` uses
it whenever it is given router logits.

Contract::

  moe_route_align_p.bind(logits, correction_bias, expert_map, *, top_k, scoring, renormalize,
                         n_group, topk_group, group_score, routed_scaling_factor, block_m,
                         backend)

  logits           float32, bfloat16 or float16 [M, E]
  correction_bias  float32 [E], or [0] for none
  expert_map       int32 [E], or [0] for none
  -> topk_weights  float32 [M, top_k]      } jax_nvfp4.route(logits, RoutingConfig(...))
     topk_ids      int32 [M, top_k]        }
     sorted_ids    int32 [P]               } jax_nvfp4.align_tokens(topk_ids, E, block_m,
     block_expert  int32 [P // block_m]    }   expert_map), P = capacity(M * top_k, E, block_m)
     num_padded    int32 [1]               }

The kernel (csrc/nvfp4_moe_route.cu) runs where a single block holds the problem
(``fits_one_block``): at most ``ROUTE_MAX_PAIRS`` (token, k) pairs, ``ROUTE_MAX_EXPERTS``
experts, ``top_k`` and ``n_group`` at most 32. Its ids equal the reference's except where the
selection scores of two experts lie within float32 rounding of each other (the sums run in
another order; on exact ties both take the lower index);
its weights agree to float32 rounding (sums in another order); its alignment is bit for bit the
alignment of its ids. Larger batches lower to ``route`` (XLA) and the alignment primitive.

``backend``: ``"auto"`` (the kernel when lowering for cuda with it built and the problem fits,
else XLA routing and the alignment's own ``"auto"``), ``"cuda"`` (CUDA code only: the kernel,
or for a batch that does not fit XLA routing and the alignment kernel; a ``ValueError`` where it
cannot lower) or ``"reference"`` (``route`` and the pure-JAX alignment).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_nvfp4 import _ffi
from jax_nvfp4.moe.align import BLOCK_MS, capacity
from jax_nvfp4.moe.routing import GROUP_SCORES, SCORING_FUNCS, RoutingConfig, route
from jax_nvfp4.ops import moe_align
from jax_nvfp4.ops._batching import batch_dim_first

CUDA_TARGET = "jax_nvfp4_moe_route_align_cuda"
LOWERINGS = ("auto", "cuda", "reference")
LOGIT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
#: One block routes and aligns: at most 1024 (token, k) pairs (the alignment's single-block
#: range), 1024 experts, 32 selected experts and 32 groups (one lane each).
ROUTE_MAX_PAIRS = 1024
ROUTE_MAX_EXPERTS = 1024
ROUTE_MAX_TOP_K = 32
ROUTE_MAX_GROUPS = 32


def fits_one_block(num_tokens: int, num_experts: int, top_k: int, n_group: int) -> bool:
  """Whether the routing kernel takes this problem (else XLA routing + the alignment kernel)."""
  return (num_tokens * top_k <= ROUTE_MAX_PAIRS and num_experts <= ROUTE_MAX_EXPERTS
          and top_k <= ROUTE_MAX_TOP_K and n_group <= ROUTE_MAX_GROUPS)


def _fail(msg: str, exc=ValueError):
  raise exc(f"moe_route_align: {msg}")


def _config(correction_bias=None, **routing) -> RoutingConfig:
  """The primitive's routing parameters as a RoutingConfig (bias: an array, or None)."""
  return RoutingConfig(correction_bias=correction_bias, **routing)


def _check(logits, correction_bias, expert_map, *, top_k, scoring, renormalize, n_group,
           topk_group, group_score, routed_scaling_factor, block_m, backend):
  if backend not in LOWERINGS:
    _fail(f"backend must be one of {LOWERINGS}, got {backend!r}")
  if np.dtype(logits.dtype) not in LOGIT_DTYPES or len(logits.shape) != 2:
    _fail(f"logits must be float32, bfloat16 or float16 [M, E], got {logits.dtype} "
          f"{tuple(logits.shape)}", TypeError)
  e = logits.shape[1]
  if np.dtype(correction_bias.dtype) != np.float32 or tuple(correction_bias.shape) not in (
      (e,), (0,)):
    _fail(f"correction_bias must be float32 [{e}] or [0], got {correction_bias.dtype} "
          f"{tuple(correction_bias.shape)}", TypeError)
  if np.dtype(expert_map.dtype) != np.int32 or tuple(expert_map.shape) not in ((e,), (0,)):
    _fail(f"expert_map must be int32 [{e}] or [0], got {expert_map.dtype} "
          f"{tuple(expert_map.shape)}", TypeError)
  if block_m not in BLOCK_MS:
    _fail(f"block_m must be one of {BLOCK_MS}, got {block_m!r}")
  if not isinstance(routed_scaling_factor, float):
    _fail(f"routed_scaling_factor must be a Python float, got {routed_scaling_factor!r}",
          TypeError)
  if scoring not in SCORING_FUNCS or group_score not in GROUP_SCORES:
    _fail(f"scoring must be one of {SCORING_FUNCS} and group_score one of {GROUP_SCORES}, got "
          f"{scoring!r}, {group_score!r}")
  _config(top_k=top_k, scoring=scoring, renormalize=renormalize, n_group=n_group,
          topk_group=topk_group, group_score=group_score,
          routed_scaling_factor=routed_scaling_factor).validate(e)


moe_route_align_p = Primitive("nvfp4_moe_route_align")
moe_route_align_p.multiple_results = True


def _abstract_eval(logits, correction_bias, expert_map, **params):
  _check(logits, correction_bias, expert_map, **params)
  m, e = logits.shape
  k, block_m = params["top_k"], params["block_m"]
  p = capacity(m * k, e, block_m)
  return (jax.core.ShapedArray((m, k), jnp.float32), jax.core.ShapedArray((m, k), jnp.int32),
          jax.core.ShapedArray((p,), jnp.int32),
          jax.core.ShapedArray((p // block_m,), jnp.int32),
          jax.core.ShapedArray((1,), jnp.int32))


moe_route_align_p.def_abstract_eval(_abstract_eval)
moe_route_align_p.def_impl(lambda *args, **params: jax.jit(
    lambda *a: moe_route_align_p.bind(*a, **params))(*args))


def _composed(logits, correction_bias, expert_map, *, block_m, backend, **routing):
  """``route`` then the alignment primitive (with ``backend``): the definition, and the path of
  problems the kernel does not take."""
  bias = correction_bias if correction_bias.shape[0] else None
  weights, ids = route(logits, _config(bias, **routing))
  aligned = moe_align.moe_align(ids, logits.shape[1], block_m,
                                expert_map if expert_map.shape[0] else None, backend=backend)
  return (weights, ids, *aligned)


_composed_rule = mlir.lower_fun(_composed, multiple_results=True)


def _default_lowering(ctx, *args, backend, **params):
  if backend == "cuda":
    raise ValueError(f"moe_route_align: backend='cuda' runs CUDA kernels, which cannot lower "
                     f"for platform(s) {tuple(ctx.module_context.platforms)}")
  return _composed_rule(ctx, *args, backend="reference", **params)


def _cuda_lowering(ctx, logits, correction_bias, expert_map, *, backend, **params):
  built = CUDA_TARGET in _ffi.REGISTERED
  m, e = ctx.avals_in[0].shape
  fits = fits_one_block(m, e, params["top_k"], params["n_group"])
  if backend == "reference" or not (built and fits):
    if backend == "cuda" and not built:
      raise ValueError(f"moe_route_align: backend='cuda' but {CUDA_TARGET} is not in this build ("
                       + (_ffi.why_no_kernels() or "target not registered") + ")")
    return _composed_rule(ctx, logits, correction_bias, expert_map, backend=backend, **params)
  return jax.ffi.ffi_lowering(CUDA_TARGET)(
      ctx, logits, correction_bias, expert_map, top_k=np.int64(params["top_k"]),
      sigmoid=np.int64(params["scoring"] == "sigmoid"),
      renormalize=np.int64(bool(params["renormalize"])), n_group=np.int64(params["n_group"]),
      topk_group=np.int64(params["topk_group"]),
      group_max=np.int64(params["group_score"] == "max"),
      routed_scaling_factor=np.float32(params["routed_scaling_factor"]),
      block_m=np.int64(params["block_m"]))


mlir.register_lowering(moe_route_align_p, _default_lowering)
mlir.register_lowering(moe_route_align_p, _cuda_lowering, platform="cuda")


def _batch(args, dims, **params):
  """One routing and alignment per batch element (lax.map): the capacity is per element."""
  _, operands = batch_dim_first(args, dims)
  return (jax.lax.map(lambda a: moe_route_align_p.bind(*a, **params), operands),
          (0, 0, 0, 0, 0))


batching.primitive_batchers[moe_route_align_p] = _batch


def moe_route_align(logits: jax.Array, config: RoutingConfig, block_m: int,
                    expert_map: jax.Array | None = None, *, backend: str = "auto"):
  """``(topk_weights, topk_ids, sorted_ids, block_expert, num_padded)`` through
  ``moe_route_align_p`` for float ``logits [M, E]``, a validated ``config`` and an optional
  int32 ``expert_map [E]`` (module docstring). ``jax_nvfp4.route_and_align`` checks its
  arguments and wraps the result."""
  if backend not in LOWERINGS:
    raise ValueError(f"moe_route_align: backend must be one of {LOWERINGS}, got {backend!r}")
  if np.dtype(logits.dtype) not in LOGIT_DTYPES:
    logits = logits.astype(jnp.float32)
  bias = (jnp.zeros((0,), jnp.float32) if config.correction_bias is None
          else jnp.asarray(config.correction_bias).astype(jnp.float32))
  emap = jnp.zeros((0,), jnp.int32) if expert_map is None else expert_map.astype(jnp.int32)
  return tuple(moe_route_align_p.bind(
      logits, bias, emap, top_k=int(config.top_k), scoring=config.scoring,
      renormalize=bool(config.renormalize), n_group=int(config.n_group),
      topk_group=int(config.topk_group), group_score=config.group_score,
      routed_scaling_factor=float(config.routed_scaling_factor), block_m=int(block_m),
      backend=backend))
